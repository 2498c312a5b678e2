"""Seeded fuzz tests of the surfaces issue #28 added (docs/reliability.md, "Fuzzing in the suite"): the web server's
fields, caption files, and command-line flags. Each input must get ONE clear answer: a 200 or a 4xx with a JSON body
from the server (never a 5xx), a loaded dataset or a DataError / ConfigError from a captions file (never another
exception, never a file outside the root read), and from the command line exit code 0, 1 or 2 with one line per
message on stderr (never a traceback).

Every test draws its cases from ``random.Random(SEED + k)``, so a failure names a case that replays; the counts are
in each docstring. The runs are tiny (a 2-block ViT, a 1-layer CLIP, a 2-block VAR on 8x8 digits latents), built
in a second without training, and torch runs on one thread (a shared 2-core machine)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import warnings
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny import save_tiny_classifier_run, save_tiny_clip, save_tiny_var
from vitkit.errors import ConfigError, DataError

SEED = 28

# ------------------------------------------------------------------------------------------ tiny runs


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two fighting
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A classifier run folder, a CLIP checkpoint and a VAR generator checkpoint (with its tokenizer)."""

    root = tmp_path_factory.mktemp("fuzz_runs")
    save_tiny_classifier_run(root / "vit")
    (root / "vit" / "summary.json").write_text(json.dumps({"epochs_done": 1, "final": {"top1": 0.5}}))

    save_tiny_clip(root / "clip")
    save_tiny_var(root)  # a generator checkpoint as training leaves it
    return {"vit": root / "vit", "clip": root / "clip", "var": root / "var", "root": root}


from test_serve import _bomb_png  # noqa: E402 - the same decompression-bomb header as the serve tests

# ------------------------------------------------------------------------------------------ input material


def _png(size=(28, 28), mode="L", seed=0, fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    shape = size[::-1] if mode == "L" else (*size[::-1], 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format=fmt)
    return buf.getvalue()


VALID_IMAGES = [_png(), _png((40, 30), "RGB", 1), _png((28, 28), "L", 2, "JPEG"), _png((16, 16), "RGB", 3, "GIF"),
                _png((12, 9), "RGB", 4, "BMP")]


def _image_bytes(rng: random.Random) -> bytes:
    """A valid small image, or one truncated, bit-flipped, a bomb, too elongated, random bytes or nothing."""
    base = rng.choice(VALID_IMAGES)
    kind = rng.randrange(12)
    if kind <= 2 or kind >= 9:
        return base
    if kind == 3:
        return base[:rng.randrange(len(base))]
    if kind == 4:
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 5:
        return rng.choice([_bomb_png(), _bomb_png(4000, 10), _bomb_png(0, 0), _png((600, 4), "L")])
    if kind == 6:
        return rng.randbytes(rng.randrange(1, 3000))
    if kind == 7:
        return rng.choice([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"BM", b"RIFF\0\0\0\0WEBP"])
    return rng.randbytes(70_000)  # over the fuzzed server's upload limit (64 KiB)


# Field values as an HTTP client or a shell sends them: strings. Numbers out of range, non-finite, huge, empty,
# other types spelled as JSON, separators, control characters, digits int() refuses, long text.
TEXT_VALUES = ["", " ", "0", "1", "2", "3", "5", "16", "63", "64", "65", "1000", "1001", "-1", "-0", "0.5", "1.5",
               "nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-1e309", str(2**31), str(2**63 - 1), str(2**63),
               str(2**64), str(2**70), "-" + str(2**70), "9" * 5000, "true", "false", "null", "none", "None", "[1, 2]",
               "{}", '{"a": 1}', "a,b", "shirt, bag, coat", "bag,bag", ",,,", " , ", "²", "--5", "٣", "0x10", "1_0",
               " 7 ", "\t", "x" * 100, "x" * 101, "y" * 30_000, "é", "🙂, 👜", "a\u2028b", "\x00", "a\x00b", "\x7f",
               "../../etc/passwd", "/etc/passwd", "T-shirt/top", "Trouser", "trouser", "uncond"]


def _text(rng: random.Random) -> str:
    return rng.choice(TEXT_VALUES)


def _classes(rng: random.Random) -> str:
    """A zero-shot ``classes`` field: mostly plausible lists, some over the caps."""
    kind = rng.randrange(6)
    if kind == 0:
        return ", ".join(rng.choice(["shirt", "bag", "coat", "a dark bag", "🙂", "x" * rng.randint(1, 120)])
                         for _ in range(rng.randint(1, 6)))
    if kind == 1:
        return ",".join(f"c{i}" for i in range(rng.choice([2, 255, 256, 257, 300])))
    if kind == 2:
        return "a," * rng.choice([1, 3, 13_000, 14_000])
    return _text(rng)


def _query(rng: random.Random, fields: dict[str, callable]) -> str:
    """A query string of some of ``fields`` (and junk names), percent-encoded, sometimes with raw bad escapes."""
    parts = []
    for name, value in fields.items():
        if rng.random() < 0.6:
            parts.append(f"{quote(name)}={quote(value(rng))}")
        if rng.random() < 0.1:  # the same field twice
            parts.append(f"{quote(name)}={quote(value(rng))}")
    if rng.random() < 0.15:
        parts.append(f"{quote(rng.choice(['bogus', 'file', 'x' * 300, '__proto__', 'topk[]']))}={quote(_text(rng))}")
    if rng.random() < 0.1:
        parts.append(rng.choice(["%FF=%FE", "seed=%ED%A0%80", "class=%00", "topk=%", "n", "=1", "&&", "a=%zz"]))
    # at most 16 KiB, uvicorn's header limit (httpx refuses 64 KiB); a cut may leave a broken %-escape
    return ("?" + "&".join(parts))[:16_000] if parts else ""


def _check_answer(r, case: str, outcomes: Counter) -> None:
    """200 or 4xx, a JSON body, and a one-line ``detail`` for a refusal written by vitkit."""
    outcomes[r.status_code] += 1
    assert r.status_code == 200 or 400 <= r.status_code < 500, f"{case}: {r.status_code} {r.text[:300]}"
    assert r.headers.get("content-type", "").startswith("application/json"), f"{case}: {r.headers}"
    body = r.json()
    if r.status_code != 200:
        assert "detail" in body, f"{case}: {body}"
        if isinstance(body["detail"], str):
            assert body["detail"] and "\n" not in body["detail"], f"{case}: {body['detail']!r}"


def _send(client, rng: random.Random, method: str, url: str, multipart_fields: dict, case: str):
    """Send ``url`` a multipart body of ``multipart_fields`` (or a urlencoded form, or a raw body of another
    content type)."""
    kind = rng.random()
    try:
        if kind < 0.8:
            files, data = [], {}
            for name, value in multipart_fields.items():
                if isinstance(value, bytes):
                    filename = rng.choice(["a.png", "x.jpg", "", "../../etc/passwd", "é.png", "a" * 300, "a\x00.png"])
                    ctype = rng.choice(["image/png", "application/octet-stream", "text/plain", "", "image/../x"])
                    files.append((name, (filename, value, ctype)))
                else:
                    data[name] = value
            if not files and rng.random() < 0.5:  # a form with only text fields is sent urlencoded by httpx
                return client.request(method, url, data=data)
            # httpx sends a multipart body only when there is a file part
            files = files or [("unrelated", ("u.txt", b"u", "text/plain"))]
            return client.request(method, url, files=files, data=data)
        content_type = rng.choice(["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; "
                                   "boundary=x", "application/json", "application/x-www-form-urlencoded",
                                   "text/plain", "image/png", "", "multipart/mixed; boundary=zz"])
        body = rng.choice([b"", b"{}", b'{"file": "a"}', b"--x\r\n", b"--x--\r\n", _image_bytes(rng),
                           b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc\r\n--x--\r\n',
                           b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
                           + rng.choice(VALID_IMAGES)[:200], rng.randbytes(500)])
        headers = {"content-type": content_type} if content_type else {}
        if rng.random() < 0.1:
            headers["content-length"] = rng.choice(["abc", "-1", str(2**70)])
            if headers["content-length"] != "abc":  # httpx would send its own; give the body as a stream
                return client.request(method, url, content=iter([body]), headers=headers)
        return client.request(method, url, content=body, headers=headers)
    except Exception as e:  # noqa: BLE001 - a server exception surfaces here (raise_server_exceptions)
        pytest.fail(f"{case}: the server raised {type(e).__name__}: {e}")


def _fuzz_app(app, client, rng: random.Random, route: str, count: int, fields: dict, multipart: callable,
              outcomes: Counter) -> None:
    for i in range(count):
        method = "POST" if rng.random() < 0.93 else rng.choice(["GET", "PUT", "DELETE", "PATCH"])
        url = route + _query(rng, fields)
        case = f"{route} case {i}: {method} {url[:200]}"
        r = _send(client, rng, method, url, multipart(rng), case)
        _check_answer(r, case, outcomes)


def _still_serves(client, app) -> None:
    """/health answers and every admission slot, decode slot, memory unit and the model were given back."""
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    service = app.state.service
    assert service._admitted == 0
    assert (service._model_slot.used, service._decode_slots.used, service._decode_memory.used) == (0, 0, 0)


def _predict_fields(rng: random.Random, clip: bool) -> dict:
    out: dict = {}
    r = rng.random()
    if r < 0.8:
        out["file"] = _image_bytes(rng)
    elif r < 0.9:
        out["file"] = _text(rng)  # a text field named file
    if rng.random() < (0.7 if clip else 0.25):
        out["classes"] = _classes(rng)
    for name in ("topk", "explain", "bogus"):
        if rng.random() < 0.1:
            out[name] = _text(rng)
    if rng.random() < 0.05:
        out["file2"] = _image_bytes(rng)
    return out


def _or_valid(valid: list[str], p: float = 0.6):
    """A field value: one of ``valid`` with probability ``p``, else any of TEXT_VALUES."""
    return lambda rng: rng.choice(valid) if rng.random() < p else _text(rng)


PREDICT_QUERY = {"topk": _or_valid(["1", "3", "5", "10", "1000"]), "explain": _or_valid(["true", "false", "0", "1"]),
                 "classes": _classes}


@pytest.fixture
def serve_app(runs):
    """``serve_app(name)``: a fresh app of a tiny run (an app's thread pools end with its TestClient's lifespan)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from vitkit.tools.serve import create_app

    def make(name: str):
        return create_app(runs[name], max_upload_bytes=64 * 1024, explain_method="rollout")

    return make


def test_server_fields_fuzz(serve_app):
    """530 seeded requests: 200 to ``/predict`` of a classifier (with the attention overlay) and 200 of a CLIP
    (zero-shot ``classes``), 100 to ``/sample`` of a VAR generator, 30 to ``/sample`` of the classifier (which
    cannot sample). Random field names, values (empty, negative, 2**63, 2**70, 5,000 digits, nan, inf, JSON spelled
    as text, 30,000 characters, NUL, "²", raw ``%FF`` escapes, fields twice, 257 class names), file parts (valid,
    truncated, bit-flipped, random bytes, bombs, 600:4, over the 64-KiB limit, a text field named ``file``, two
    files), other methods, and raw bodies of other content types or with a bad Content-Length. Every answer is a
    200 or a 4xx with a JSON body (a one-line ``detail``); afterwards ``/health`` answers and every admission slot,
    decode slot, decode-memory unit and the model are free again. About 5 s on 2 busy cores (the /sample
    successes load the run each time: ~0.1 s)."""
    from fastapi.testclient import TestClient

    sample_query = {"class": _or_valid(["0", "9", "none", "Bag", "2"], 0.2), "n": _or_valid(["1", "2", "3"], 0.5),
                    "seed": _or_valid(["0", "1", str(2**63 - 1)], 0.5)}

    def sample_body(rng):
        return {k: _text(rng) for k in ("class", "n", "seed", "bogus") if rng.random() < 0.1}

    plan = [("vit", "/predict", 200, PREDICT_QUERY, lambda r: _predict_fields(r, clip=False)),
            ("clip", "/predict", 200, PREDICT_QUERY, lambda r: _predict_fields(r, clip=True)),
            ("var", "/sample", 100, sample_query, sample_body),
            ("vit", "/sample", 30, sample_query, sample_body)]
    outcomes: Counter = Counter()
    for k, (name, route, count, query, body) in enumerate(plan):
        app = serve_app(name)
        with TestClient(app) as client:
            _fuzz_app(app, client, random.Random(SEED + k), route, count, query, body, outcomes)
            _still_serves(client, app)
    assert sum(outcomes.values()) == 530
    assert min(outcomes[200], outcomes[400], outcomes[405], outcomes[413]) >= 10 and not outcomes[422], outcomes


@pytest.mark.parametrize("name, route, params, files, data", [
    # "²" is a digit to str.isdigit but not to int(): a 500 (ValueError) before the fix; "--5" likewise
    ("var", "/sample", {"class": "²"}, None, None),
    ("var", "/sample", {"class": "--5", "n": "1"}, None, None),
])
def test_server_regressions(serve_app, name, route, params, files, data):
    from fastapi.testclient import TestClient

    with TestClient(serve_app(name)) as client:
        r = client.post(route, params=params, files=files, data=data)
        assert r.status_code == 400 and "unknown class" in r.json()["detail"], r.text


def test_unknown_sample_class_is_refused_before_the_run_is_reloaded(serve_app, monkeypatch):
    """A refused class cost a reload of the whole run in the model thread (~0.1 s here, seconds for a real
    generator), most of the fuzz's /sample 400s. The served run's classes are known when the server starts."""
    from fastapi.testclient import TestClient

    app = serve_app("var")
    service = app.state.service
    assert service.class_names[:2] == ["T-shirt/top", "Trouser"]
    monkeypatch.setattr(service, "_sample", lambda *a: pytest.fail("the run was reloaded for a refused class"))
    with TestClient(app) as client:
        for name in ("giraffe", "10", "-1", "²", ""):
            r = client.post("/sample", params={"class": name, "n": "1"})
            assert r.status_code == 400 and "unknown class" in r.json()["detail"], r.text


# ------------------------------------------------------------------------------------------ caption files


def _caption_root(tmp_path: Path) -> tuple[Path, Path]:
    """The data root (images, a sub-folder, a broken image, a folder named like an image, a link pointing out of
    the root) and a folder beside it holding an image that must never be read."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for i, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        Image.fromarray(np.full((8, 8), 40 * i + 20, np.uint8)).save(root / name)
    Image.fromarray(np.full((6, 10), 200, np.uint8)).save(root / "wide.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (root / "bomb.png").write_bytes(_bomb_png())
    (root / "dir.png").mkdir()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "link.png")
    return root, outside


CAPTION_FILES = ["a.png", "b.png", "sub/c.png", "./a.png", "sub/../b.png", "wide.png", "broken.png", "bomb.png",
                 "dir.png", "sub", ".", "", " ", "missing.png", "link.png", "../outside/secret.png",
                 "sub/../../outside/secret.png", "a.png/..", "a.png\x00.txt", "\x00", "n" * 300 + ".png",
                 "é.png", "a.png ", "A.PNG", "~/a.png", "$HOME/a.png", "%2e%2e/outside/secret.png", "\ud800.png",
                 "a\udcff.png"]
CAPTIONS = ["a grey square", "x", "", " ", "\t\n", "😀 emoji", "line\u2028sep", "nul\x00byte", "y" * 5000,
            "quote \" inside", "comma, inside", "new\nline", "lone \udcff surrogate"]
JSON_ODD = [None, 1, -1.5, True, [], ["a.png"], {}, {"file": "a.png"}, float("nan"), float("inf"), 2**70]


def _caption_rows(rng: random.Random, outside: Path) -> list[tuple]:
    rows = []
    for _ in range(rng.randint(0, 7)):
        if rng.random() < 0.6:
            rows.append((rng.choice(["a.png", "b.png", "sub/c.png"]), rng.choice(CAPTIONS[:2])))
            continue
        file = rng.choice([*CAPTION_FILES, str(outside / "secret.png"), "/etc/passwd", "/proc/self/environ"])
        rows.append((file, rng.choice(CAPTIONS)))
    return rows


def _jsonl_bytes(rng: random.Random, rows: list[tuple]) -> bytes:
    lines = []
    for file, caption in rows:
        kind = rng.randrange(20)
        if kind == 0:
            lines.append(json.dumps({"file": rng.choice(JSON_ODD), "caption": caption}))
        elif kind == 1:
            lines.append(json.dumps({"file": file, "caption": rng.choice(JSON_ODD)}))
        elif kind in (2, 3):
            lines.append(rng.choice([json.dumps({"file": file}), json.dumps({"caption": caption}), json.dumps([file]),
                                     "null", "1", '"text"', "{", '{"file": "a.png", "caption": "x"', "[" * 5000,
                                     '{"file": ' + "1" * 5000 + ', "caption": "x"}', '{"file": "\\ud800", "caption"'
                                     ': "x"}', '{"file": "a.png", "caption": "\\udcff"}', "NaN", "\x00"]))
        else:
            obj = {"file": file, "caption": caption}
            if rng.random() < 0.1:
                obj["extra"] = rng.choice(JSON_ODD)
            lines.append(json.dumps(obj, ensure_ascii=rng.random() < 0.5))
    if rng.random() < 0.05:
        lines.append(json.dumps({"file": "a.png", "caption": "z" * ((1 << 20) + 10)}))
    sep = rng.choice(["\n", "\r\n", "\n\n", "\u2028"])
    return sep.join(lines).encode("utf-8", "surrogatepass")


def _csv_bytes(rng: random.Random, rows: list[tuple]) -> bytes:
    import csv

    buf = io.StringIO()
    header = rng.choice([["file", "caption"]] * 6 + [["caption", "file"], ["file", "caption", "more"],
                                                     ["file", "file", "caption"], ["file"], ["path", "text"], [],
                                                     ["\ufefffile", "caption"]])
    writer = csv.writer(buf, quoting=rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    if header:
        writer.writerow(header)
    for file, caption in rows:
        row = [file, caption] if rng.random() < 0.85 else rng.choice([[file], [file, caption, "x", "y"], []])
        writer.writerow(row)
    text = buf.getvalue()
    if rng.random() < 0.1:
        text += rng.choice(['a.png,"unclosed quote\n', '"a.png"x,y\n', "a.png,\"" + "z" * ((1 << 20) + 10) + '"\n'])
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """Encoding damage: a BOM, bad UTF-8, NUL bytes, a truncation, a flipped byte, or nothing."""
    kind = rng.randrange(14)
    if kind == 0:
        return b"\xef\xbb\xbf" + data
    if kind == 1 and data:
        i = rng.randrange(len(data))
        return data[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xfe\xff"]) + data[i:]
    if kind == 2 and data:
        i = rng.randrange(len(data))
        return data[:i] + b"\x00" + data[i:]
    if kind == 3 and data:
        return data[:rng.randrange(len(data))]
    if kind == 4 and data:
        out = bytearray(data)
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 5:
        return rng.choice([b"", b"\xff\xfe", b"\xfe\xff\x00f", "file,caption\n".encode("utf-16")])
    return data


def test_caption_files_fuzz(tmp_path, monkeypatch):
    """200 seeded caption files (CSV and JSONL, through ``build_dataset("caption_folder")``), from 0-7 rows (60% valid,
    the others drawn from 32 file names: missing, broken, bombs, folders, ``..``, absolute paths, a link out of the
    root, NUL bytes, 300-character names, lone surrogates; and 13 captions: empty, emoji, NUL, 5,000 characters,
    U+2028, a lone surrogate), JSONL
    values of the wrong type, missing keys, malformed lines, 5,000-digit numbers, 5,000-deep arrays, fields over
    1 MiB, CSV headers without the columns, short and long rows, unclosed quotes; then encoding damage (BOM, bad
    UTF-8, NUL bytes, truncation, UTF-16). Each load gives a dataset, with skipped rows counted in one warning, or
    a DataError / ConfigError with a one-line message; no image outside the root is ever decoded."""
    import vitkit.data.image_io as image_io
    from vitkit.data import build_dataset

    root, outside = _caption_root(tmp_path)
    real_root = root.resolve()
    read: list[Path] = []
    real_decode = image_io.decode_image

    def watched(src, *args, **kwargs):
        read.append(Path(src).resolve())
        return real_decode(src, *args, **kwargs)

    monkeypatch.setattr(image_io, "decode_image", watched)
    rng = random.Random(SEED + 10)
    outcomes: Counter = Counter()
    for i in range(200):
        rows = _caption_rows(rng, outside)
        jsonl = rng.random() < 0.5
        data = _mutate(rng, _jsonl_bytes(rng, rows) if jsonl else _csv_bytes(rng, rows))
        for old in root.glob("train.*"):
            old.unlink()
        (root / ("train.jsonl" if jsonl else "train.csv")).write_bytes(data)
        case = f"case {i} ({'jsonl' if jsonl else 'csv'}): {data[:300]!r}"
        budget = rng.choice([0, 1, 3, 100, 100])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = build_dataset("caption_folder", "train", root=str(root), num_channels=rng.choice([1, 3]),
                                   image_size=rng.choice([8, 8, None]), max_bad_images=budget)
            except (DataError, ConfigError) as e:
                assert str(e) and "\n" not in str(e), f"{case}: {e!r}"
                outcomes[type(e).__name__] += 1
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{case}: {type(e).__name__}: {e}")
            else:
                assert len(ds) >= 1 and len(ds.captions) == len(ds) and all(c.strip() for c in ds.captions), case
                skipped = [w for w in caught if "rows skipped" in str(w.message)]
                assert len(skipped) <= 1, case
                if skipped:
                    message = str(skipped[0].message)
                    assert "\n" not in message and int(message.split(": ")[1].split(" of ")[0]) <= budget, case
                outcomes["loaded with skipped rows" if skipped else "loaded"] += 1
        outside_reads = [p for p in read if real_root not in p.parents]
        assert not outside_reads, f"{case}: read {outside_reads}"
    assert sum(outcomes.values()) == 200 and outcomes["DataError"] and outcomes["loaded"], outcomes


@pytest.mark.parametrize("line", [
    '{"file": "a.png\\u0000", "caption": "x"}',  # ValueError: embedded null byte (before the fix)
    '{"file": "' + "n" * 300 + '.png", "caption": "x"}',  # OSError: File name too long
    '{"file": "\\ud800", "caption": "x"}',  # UnicodeEncodeError: surrogates not allowed
    '{"file": "a.png", "caption": "\\udcff"}',  # a caption the tokenizer would refuse mid-training
])
def test_caption_file_names_the_file_system_refuses_are_bad_rows(tmp_path, line):
    from vitkit.data.captions import load_caption_folder

    root, _ = _caption_root(tmp_path)
    (root / "caps.jsonl").write_text(line + "\n" + json.dumps({"file": "a.png", "caption": "fine"}) + "\n")
    with pytest.raises(DataError, match="1 bad rows of 2") as e:
        load_caption_folder(root, root / "caps.jsonl", num_channels=1)
    assert "\n" not in str(e.value) and len(str(e.value)) < 500
    with pytest.warns(UserWarning, match="1 of 2 rows skipped"):
        assert len(load_caption_folder(root, root / "caps.jsonl", num_channels=1, max_bad_images=1)) == 1


@pytest.mark.parametrize("line, reason", [
    ("[" * 5000, "nested too deeply"),  # RecursionError before the fix
    ('{"file": ' + "1" * 5000 + ', "caption": "x"}', "4300 digits"),  # ValueError before the fix
])
def test_jsonl_lines_json_cannot_read_are_data_errors(tmp_path, line, reason):
    from vitkit.data.captions import load_caption_folder

    (tmp_path / "caps.jsonl").write_text(line + "\n")
    with pytest.raises(DataError, match=reason):
        load_caption_folder(tmp_path, tmp_path / "caps.jsonl")


# ------------------------------------------------------------------------------------------ command-line flags

# What a shell can pass: no NUL byte; undecodable bytes arrive as lone surrogates \udc80-\udcff.
FLAG_VALUES = ["nan", "NaN", "inf", "-inf", "-1", "0", "1", "2", "3", "8", "0.5", "1.5", "1e-9", "1e309", "-0",
               str(2**63 - 1), str(2**63), str(2**70), "9" * 5000, "", " ", "abc", "\udcff\udcfe", "é", "²", "--5",
               "-5", "0x1f", "1_0", "none", "true", "[1,", "x=[1,", "x" * 10_000, "--", "-", "--help-me"]


def _flag(rng: random.Random) -> str:
    return rng.choice(FLAG_VALUES)


def _flag_or(valid: list[str], p: float = 0.5):
    """A flag value: one of ``valid`` with probability ``p``, else any of FLAG_VALUES."""
    return lambda rng: rng.choice(valid) if rng.random() < p else _flag(rng)


class _CLI:
    """``vitkit.cli.main`` with stdout and stderr as a UTF-8 terminal has them (stdout strict, stderr
    backslashreplace), in ``cwd``; checks the answer's form, records it, returns (exit code, stderr, stdout
    bytes)."""

    def __init__(self, cwd: Path, monkeypatch) -> None:
        self.cwd, self.monkeypatch, self.outcomes = cwd, monkeypatch, Counter()

    def __call__(self, argv: list[str], case: str) -> tuple[int, str, bytes]:
        from vitkit.cli import main

        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
        err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
        self.monkeypatch.chdir(self.cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("default")
                try:
                    code = main(argv)
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except Exception as e:  # noqa: BLE001 - what the user would see as a traceback
            pytest.fail(f"{case}: argv={argv!r}: {type(e).__name__}: {str(e)[:300]}")
        text = err.buffer.getvalue().decode("utf-8")
        assert code in (0, 1, 2), f"{case}: exit {code}: {text[:500]}"
        assert "Traceback" not in text, f"{case}: {text[:2000]}"
        lines = text.strip().splitlines()
        if code == 2:  # one error line, and at most one-line warnings above it
            assert lines and all(line.startswith("vitkit") for line in lines), f"{case}: argv={argv!r}: {text[:1000]}"
            assert sum(": error: " in line for line in lines) == 1, f"{case}: argv={argv!r}: {text[:1000]}"
        self.outcomes[(argv[0], code)] += 1
        return code, text, out.buffer.getvalue()


def _maybe(rng: random.Random, argv: list[str], flag: str, value: callable, p: float = 0.35) -> None:
    if rng.random() < p:
        argv += [flag, value(rng)]


def _out_path(rng: random.Random, tmp: Path, suffix: str) -> str:
    return rng.choice([f"out{suffix}", f"new/folder/out{suffix}", "out.gif", "out", "", str(tmp), str(tmp) + "/",
                       f"fifo{suffix}", f"\udcff{suffix}", f"{'n' * 300}{suffix}", f"file.txt/out{suffix}",
                       f"link{suffix}", f"OUT{suffix.upper()}", _flag(rng)])


def _cli_material(tmp: Path, runs: dict) -> dict:
    (tmp / "img.png").write_bytes(_png())
    (tmp / "rgb.jpg").write_bytes(_png((40, 30), "RGB", 1, "JPEG"))
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp / "bomb.png").write_bytes(_bomb_png())
    (tmp / "\udcff.png").write_bytes(_png())  # a file name that is not UTF-8
    (tmp / "file.txt").write_text("a file where a folder is expected")
    (tmp / "adir.png").mkdir()
    os.mkfifo(tmp / "fifo.png")
    os.mkfifo(tmp / "fifo.onnx")
    os.symlink(tmp / "fifo.png", tmp / "link.png")
    os.symlink(tmp / "fifo.onnx", tmp / "link.onnx")
    (tmp / "bad.py").write_text("def (:\n")
    (tmp / "ok.py").write_text("def table(doc_dir, plots=True, **args):\n    return '| a |\\n|---|'\n")
    (tmp / "results.jsonl").write_text('{"g": "a", "v": 1}\n{"g": "a", "v": 2}\n{"g": "b", "v": 3}\n')
    (tmp / "latin1.md").write_bytes("caf\xe9 <!-- report: table results=results.jsonl group=g columns=v -->\n"
                                    "<!-- /report -->\n".encode("latin-1"))
    return {"images": ["img.png", "rgb.jpg", "\udcff.png", "broken.png", "bomb.png", "missing.png", "adir.png",
                       "fifo.png", "file.txt", "", str(tmp)],
            "runs": {"vit": str(runs["vit"]), "clip": str(runs["clip"]), "var": str(runs["var"]),
                     "missing": str(tmp / "no_such_run"), "file": str(tmp / "file.txt")}}


REPORT_MARKERS = [
    "table results=results.jsonl group=g columns=v", "table results=results.jsonl group=g columns=v:V:zz",
    "table results=results.jsonl group=g columns=v order=a,c", "table results=missing.jsonl group=g columns=v",
    "table results=../../etc/passwd group=g columns=v", "table", "bogus kind=1", 'table "unclosed',
    "verdict results=results.jsonl group=g value=v contrast=a:1,b:-1 expect=above",
    "verdict results=results.jsonl group=g value=v contrast=a:x,b:-1 expect=above",
    "verdict results=results.jsonl group=g value=v contrast=a:nan,b:inf expect=within margin=nan",
    "verdict results=results.jsonl group=g value=v contrast=a:1,b:-1 expect=sideways baseline=x",
    "ablation results=results.jsonl study=nope", "script script=README.md function=f",
    "script script=../../../etc/passwd function=f", "table results=results.jsonl group=g columns=v noeq",
    "script script=latin1.md function=f", "script script=bad.py function=f", "script script=ok.py function=nope",
    "script script=ok.py function=table",
]


def _report_doc(rng: random.Random, tmp: Path, i: int) -> str:
    name = f"doc{i}.md"
    blocks = [f"<!-- report: {rng.choice(REPORT_MARKERS)} -->\nold\n<!-- /report -->\n"
              for _ in range(rng.randint(0, 2))]
    text = "# a doc\n\n" + "".join(blocks)
    data = text.encode("utf-8")
    if rng.random() < 0.15:
        data = rng.choice([b"\xef\xbb\xbf" + data, data + b"\xff\xfe", data.replace(b"-->", b"\x00-->", 1)])
    (tmp / name).write_bytes(data)
    return name


def _cli_case(rng: random.Random, tmp: Path, m: dict, i: int) -> list[str]:
    """One command line of the six commands, flags drawn at random."""
    command = ["sample", "sparsevit", "serve", "export", "predict", "report"][i % 6]
    runs = m["runs"]
    if command == "sample":
        real = rng.random() < 0.3  # the real generator with few images; any --n on a missing run
        argv = ["sample", runs["var"] if real else rng.choice([runs["missing"], runs["vit"], runs["file"]])]
        if rng.random() < 0.95:
            argv += ["--class", _flag_or(["0", "9", "none", "Bag", "trouser", "10"], 0.7)(rng)]
        n = _flag_or(["1", "2", "3"], 0.7)(rng)
        if real and n.isdigit() and int(n) > 3:
            n = "4097"
        _maybe(rng, argv, "--n", lambda r: n, 0.9 if real else 0.5)
        _maybe(rng, argv, "--steps", _flag_or(["0", "2"]), 0.1)  # a var generator takes none
        for flag, valid in (("--cfg", ["0", "1.5", "3"]), ("--top-k", ["0", "1", "5"]),
                            ("--seed", ["0", "1", str(2**63 - 1)])):
            _maybe(rng, argv, flag, _flag_or(valid, 0.7), 0.3)
        _maybe(rng, argv, "--out", lambda r: r.choice(["out.png", "new/folder/g.jpg", "OUT.PNG", "g.webp"])
               if r.random() < 0.6 else _out_path(r, tmp, ".png"), 0.5)
    elif command == "sparsevit":
        argv = ["sparsevit", rng.choice(["search", "search", "search", "prune", ""]),
                rng.choice([runs["missing"], runs["file"]])]
        for flag in ("--budget-ms", "--speedup", "--choices"):
            if rng.random() < 0.4:
                argv += [flag, *(_flag(rng) for _ in range(rng.randint(1, 3)))]
        for flag in ("--population", "--generations", "--eval-images", "--latency-batch", "--seed", "--split",
                     "--data"):
            _maybe(rng, argv, flag, _flag, 0.25)
        _maybe(rng, argv, "--data-arg", lambda r: r.choice(["num_scenes=2", "x=[1,", "=1", "noeq", "a=" + _flag(r),
                                                            "a=!!python/object:os.system", "a=*x", "a=" + "9" * 5000]))
        _maybe(rng, argv, "--out", lambda r: _out_path(r, tmp, ""), 0.3)
    elif command == "serve":
        # parse and check only: the run never exists, so no server starts
        argv = ["serve", rng.choice([runs["missing"], runs["file"]])]
        for flag in ("--host", "--port", "--max-upload-mb", "--explain", "--max-pending", "--request-timeout",
                     "--max-connections", "--decode-memory-mb"):
            _maybe(rng, argv, flag, _flag, 0.3)
    elif command == "export":
        argv = ["export", rng.choice(["onnx", "onnx", "onnx", "tflite", ""]),
                rng.choice([runs["missing"], runs["file"]]), _out_path(rng, tmp, ".onnx")]
        for flag in ("--opset", "--atol"):
            _maybe(rng, argv, flag, _flag)
        for flag in ("--static-size", "--no-check"):
            if rng.random() < 0.2:
                argv.append(flag)
    elif command == "predict":
        argv = ["predict", rng.choice([runs["vit"], runs["vit"], runs["clip"], runs["var"], runs["missing"],
                                       runs["file"]])]
        argv += [rng.choice(m["images"][:3] if rng.random() < 0.7 else m["images"]) for _ in range(rng.randint(0, 3))]
        _maybe(rng, argv, "--topk", _flag_or(["1", "3", "10", "11", "1000", str(2**63)]), 0.5)
        if rng.random() < 0.3:
            argv.append("--json")
    else:
        argv = ["report"] + [_report_doc(rng, tmp, i) if rng.random() < 0.6 else
                             rng.choice(["latin1.md", "missing.md", "adir.png", "fifo.png", "\udcff.md", _flag(rng)])
                             for _ in range(rng.choice([0, 1, 1, 1, 2]))]
        if rng.random() < 0.5:
            argv.append("--check")
    if rng.random() < 0.08:  # a flag the command does not have, or a bare option
        argv.insert(rng.randrange(1, len(argv) + 1), rng.choice(["--bogus", "-x", "--n", "--help-me", "--"]))
    return argv


def test_cli_flags_fuzz(runs, tmp_path, monkeypatch):
    """300 seeded command lines, 50 each of ``vitkit sample`` (30% on a real tiny generator, at most 10 images),
    ``sparsevit search``, ``serve`` (the run never exists: the flags are parsed and checked, no server starts),
    ``export onnx`` (a missing run: the destination is checked before the load), ``predict`` (real tiny
    classifier, CLIP and generator runs; valid, broken, bomb, missing, non-UTF-8-named images) and ``report``
    (docs with random markers, Latin-1 bytes, NUL, BOM). Values: nan, inf, -1, 0, 2**63, 2**70, 5,000 digits,
    empty, lone surrogates (undecodable argv bytes), broken YAML, 10,000 characters, paths to FIFOs, folders,
    links, missing folders. Exit code 0, 1 or 2, for code 2 one ``vitkit …: error:`` line (and only ``vitkit``
    lines), never a traceback; stdout is a strict UTF-8 stream as under en_US.UTF-8. About 2 s."""
    material = _cli_material(tmp_path, runs)
    cli = _CLI(tmp_path, monkeypatch)
    rng = random.Random(SEED + 20)
    for i in range(300):
        argv = _cli_case(rng, tmp_path, material, i)
        cli(argv, f"case {i}")
    codes = Counter(code for (_, code), n in cli.outcomes.items() for _ in range(n))
    assert sum(codes.values()) == 300 and codes[0] and codes[2], cli.outcomes
    # the FIFOs were never replaced by files
    assert (tmp_path / "fifo.png").is_fifo() and (tmp_path / "fifo.onnx").is_fifo()


@pytest.mark.parametrize("argv, code, expected", [
    # ValueError tracebacks before the fix: "²" is a digit to str.isdigit but not to int()
    (["sample", "{var}", "--class", "²", "--n", "1"], 2, "unknown class"),
    (["sample", "{var}", "--class=--5", "--n", "1"], 2, "unknown class"),
    # yaml's ParserError and int()'s digit limit: tracebacks before the fix
    (["sparsevit", "search", "{missing}", "--speedup", "2", "--data-arg", "x=[1,"], 2, "not valid YAML"),
    (["sparsevit", "search", "{missing}", "--speedup", "2", "--data-arg", "x=" + "9" * 5000], 2, "not valid YAML"),
    # KeyError: 'input_size' (a generator's config has none)
    (["predict", "{var}", "img.png"], 2, "takes no image files"),
    # UnicodeEncodeError printing the path on a strict UTF-8 stdout (en_US.UTF-8)
    (["predict", "{vit}", "\udcff.png"], 0, ""),
    # UnicodeDecodeError reading a Latin-1 doc
    (["report", "latin1.md"], 2, "latin1.md:1: not UTF-8 text (byte 0xe9"),
    # AttributeError: a `script` marker naming a file that is not Python
    (["report", "{doc}"], 2, "not a Python script"),
    # exit 0 having checked nothing: run outside the repository, no doc found
    (["report", "--check"], 2, "no doc with report blocks"),
])
def test_cli_regressions(runs, tmp_path, monkeypatch, argv, code, expected):
    _cli_material(tmp_path, runs)
    (tmp_path / "doc.md").write_text("<!-- report: script script=latin1.md function=f -->\n<!-- /report -->\n")
    cli = _CLI(tmp_path, monkeypatch)
    argv = [a.format(var=runs["var"], vit=runs["vit"], missing=tmp_path / "no_such_run", doc="doc.md")
            for a in argv]
    got, err, out = cli(argv, "regression")
    assert got == code and expected in err, err
    if argv[0] == "predict" and code == 0:
        assert out.startswith(b"\xff.png\n")  # the name's bytes, as given
