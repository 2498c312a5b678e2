"""Write Fashion-MNIST test images as PNG files to try `vitkit predict`, `explain` and `serve` on.

    python scripts/fmnist_samples.py samples        # samples/ankle_boot.png, samples/trouser.png, ... (one per class)
    python scripts/fmnist_samples.py samples --per-class 3
    python scripts/fmnist_samples.py samples --canvases 4   # also captioned 28x56 test canvases, for CLIP / ViLT

Each file is named after its class (``T-shirt/top`` -> ``t-shirt_top.png``; with ``--per-class N`` > 1 a number is
appended). ``--canvases N`` also writes ``canvas_0.png`` ... and their captions, one a line, in ``captions.txt``
(the ``fmnist_captions`` test split: one or two items side by side). The images come from the test split, found
where training finds it (``--data-dir``, Debian's ``dataset-fashion-mnist`` package or
``$VITKIT_DATA/fashion-mnist``; ``make data`` puts it there).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def file_stem(class_name: str) -> str:
    """``'T-shirt/top'`` -> ``'t-shirt_top'``, ``'Ankle boot'`` -> ``'ankle_boot'``."""
    return re.sub(r"[^a-z0-9-]+", "_", class_name.lower()).strip("_")


def write_samples(out: str | Path, per_class: int = 1, data_dir: str | None = None) -> list[Path]:
    """The first ``per_class`` test images of every class, as 28x28 grayscale PNGs in ``out``; their paths."""
    import numpy as np
    from PIL import Image

    from vitkit.data import fashion_mnist as fm
    from vitkit.data.constants import FMNIST_CLASSES
    from vitkit.errors import DataError

    folder = fm.find_dir(data_dir, "test")
    if folder is None:
        raise DataError("Fashion-MNIST's test split not found: run `make data` (or pass --data-dir)")
    images, labels = fm.load_arrays(folder, "test")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, name in enumerate(FMNIST_CLASSES):
        rows = np.flatnonzero(np.asarray(labels) == index)[:per_class]
        for k, row in enumerate(rows):
            path = out / (f"{file_stem(name)}.png" if per_class == 1 else f"{file_stem(name)}_{k}.png")
            Image.fromarray(np.asarray(images[row], dtype=np.uint8)).save(path)
            written.append(path)
    return written


def write_canvases(out: str | Path, num: int, data_dir: str | None = None) -> list[Path]:
    """``num`` captioned test canvases as ``canvas_<i>.png`` and their captions in ``captions.txt``; the paths."""
    import numpy as np
    from PIL import Image

    from vitkit.data.captions import load_fmnist_captions

    data = load_fmnist_captions("test", data_dir, num=num)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(len(data)):
        path = out / f"canvas_{i}.png"
        Image.fromarray(data.images[i, 0].numpy().astype(np.uint8)).save(path)
        written.append(path)
    (out / "captions.txt").write_text("".join(f"{c}\n" for c in data.captions), encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/fmnist_samples.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the PNG files into")
    parser.add_argument("--per-class", type=int, default=1, help="images per class (default 1)")
    parser.add_argument("--canvases", type=int, default=0, metavar="N",
                        help="also N captioned canvases (canvas_<i>.png) and their captions.txt")
    parser.add_argument("--data-dir", help="where Fashion-MNIST lives (default: where training looks)")
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.canvases < 0:
        parser.error("--per-class must be >= 1 and --canvases >= 0")
    from vitkit.errors import VitkitError

    try:
        paths = write_samples(args.out, args.per_class, args.data_dir)
        canvases = write_canvases(args.out, args.canvases, args.data_dir) if args.canvases else []
    except VitkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} images to {args.out}: {', '.join(p.name for p in paths[:3])}, ...")
    if canvases:
        print(f"wrote {len(canvases)} captioned canvases (canvas_<i>.png) and {Path(args.out) / 'captions.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
