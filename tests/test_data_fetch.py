"""data.py's fetch: the public files into the cache, checked by sha256. Every test serves its files from a
local http.server on 127.0.0.1 (never the internet); a fake table stands in for FILES and ARCHIVES."""
import functools
import hashlib
import http.server
import io
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

import data
from conftest import find_data

ROOT = Path(__file__).resolve().parents[1]
sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the server's folder; logs each path; for paths in `cut`, sends half the bytes and hangs up."""

    def do_GET(self):
        self.server.log.append(self.path)
        body = self.server.cut.get(self.path)
        if body is None:
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL, requested paths, {path: bytes to cut short})."""
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=folder))
    httpd.log, httpd.cut = [], {}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_port}", httpd.log, httpd.cut
    httpd.shutdown()
    httpd.server_close()


def put(folder, path, blob):
    (folder / path).parent.mkdir(parents=True, exist_ok=True)
    (folder / path).write_bytes(blob)


FILES = {"t5_spiece.model": b"vocab" * 100, "glue/SST-2/dev.tsv": b"sentence\tlabel\nhello\t1\n",
         "glue/SST-2/train.tsv": bytes(range(256)) * 20}


@pytest.fixture
def mirror(server, monkeypatch):
    """A mirror of a three-file layout; data.FILES is that table."""
    folder, url, log, cut = server
    for path, blob in FILES.items():
        put(folder, path, blob)
    monkeypatch.setattr(data, "FILES", [(p, "https://example.invalid/" + p, len(b), sha(b))
                                        for p, b in FILES.items()])
    return url, log, folder


def cached(root):
    """Every file under root, hidden ones (temporaries) included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_fetch_from_a_mirror_and_a_second_run_downloads_nothing(mirror, tmp_path, monkeypatch, capsys):
    url, log, _ = mirror
    monkeypatch.setattr(data, "PROGRESS_BYTES", 5000)          # glue/SST-2/train.tsv (5,120 bytes) gets a bar
    root = data.fetch(root=tmp_path / "cache", mirror=url)
    assert cached(root) == sorted(FILES)
    assert all((root / p).read_bytes() == b for p, b in FILES.items())
    assert sorted(log) == sorted("/" + p for p in FILES)
    err = capsys.readouterr().err
    assert "glue/SST-2/train.tsv [" + "#" * 30 + "] 0.0/0.0 MiB" in err and "t5_spiece.model [" not in err
    assert data.missing(root=root) == []
    data.fetch(root=root, mirror=url)
    assert len(log) == len(FILES)                              # nothing downloaded again
    assert data.fetch(["glue"], root=root, mirror=url) == root


def test_fetch_by_name_and_unknown_names(mirror, tmp_path):
    url, log, _ = mirror
    root = data.fetch(["glue/SST-2/dev.tsv"], root=tmp_path / "cache", mirror=url)
    assert cached(root) == ["glue/SST-2/dev.tsv"] and log == ["/glue/SST-2/dev.tsv"]
    with pytest.raises(data.FetchError, match="nothing to fetch under gleu; names are files or folders of "
                                              "glue, t5_spiece.model"):
        data.fetch(["gleu"], root=root, mirror=url)


def test_a_changed_byte_fails_naming_the_file_url_and_both_hashes_and_caches_nothing(mirror, tmp_path):
    url, _, folder = mirror
    changed = bytearray(FILES["glue/SST-2/train.tsv"])
    changed[100] ^= 1
    put(folder, "glue/SST-2/train.tsv", bytes(changed))
    root = tmp_path / "cache"
    with pytest.raises(data.FetchError) as e:
        data.fetch(["glue/SST-2/train.tsv"], root=root, mirror=url)
    msg = str(e.value)
    assert f"glue/SST-2/train.tsv from {url}/glue/SST-2/train.tsv: sha256 {sha(bytes(changed))}, expected " \
           f"{sha(FILES['glue/SST-2/train.tsv'])}; nothing was saved" == msg
    assert cached(root) == []


def test_a_cached_file_with_other_bytes_is_fetched_again(mirror, tmp_path):
    url, log, _ = mirror
    root = data.fetch(root=tmp_path / "cache", mirror=url)
    (root / "t5_spiece.model").write_bytes(b"truncated")
    assert [r[0] for r in data.missing(root=root)] == ["t5_spiece.model"]
    data.fetch(root=root, mirror=url)
    assert (root / "t5_spiece.model").read_bytes() == FILES["t5_spiece.model"] and len(log) == len(FILES) + 1


def test_an_interrupted_download_leaves_no_file_and_the_next_run_completes(server, mirror, tmp_path):
    url, log, _ = mirror
    cut = server[3]
    cut["/glue/SST-2/train.tsv"] = FILES["glue/SST-2/train.tsv"]
    root = tmp_path / "cache"
    with pytest.raises(data.FetchError, match="glue/SST-2/train.tsv"):
        data.fetch(["glue/SST-2/train.tsv"], root=root, mirror=url)
    assert cached(root) == []                                   # no half file, no temporary
    cut.clear()
    data.fetch(["glue/SST-2/train.tsv"], root=root, mirror=url)
    assert (root / "glue/SST-2/train.tsv").read_bytes() == FILES["glue/SST-2/train.tsv"]


def test_ctrl_c_during_a_download_leaves_no_file(mirror, tmp_path, monkeypatch):
    url, _, _ = mirror

    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "PROGRESS_BYTES", 1)
    monkeypatch.setattr(data, "_progress", interrupt)
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        data.fetch(["glue/SST-2/train.tsv"], root=root, mirror=url)
    assert cached(root) == []


def test_offline_is_one_line_naming_what_it_could_not_reach(mirror, tmp_path):
    """The CLI, against a port nobody listens on: exit 1, one line on stderr, nothing cached."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"SPOT_DATA": str(tmp_path / "cache"), "SPOT_DATA_MIRROR": dead, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "data.py"), "fetch", "t5_spiece.model"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"fetch: could not reach {dead}/t5_spiece.model (") and \
        "for t5_spiece.model; fetch from a copy with SPOT_DATA_MIRROR=URL" in out.stderr
    assert cached(tmp_path / "cache") == []


def test_cli_prints_the_cache_folder(server, tmp_path, shared_data):
    folder, url, _, _ = server
    put(folder, "glue/SST-2/dev.tsv", (shared_data / "glue/SST-2/dev.tsv").read_bytes())
    env = {"SPOT_DATA": str(tmp_path / "cache"), "SPOT_DATA_MIRROR": url, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "data.py"), "fetch", "glue/SST-2/dev.tsv"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == f"{tmp_path / 'cache'}\n"
    assert "fetched 1 file(s)" in out.stderr


# ----------------------------------------------------------------------------- the public homes' formats
MSR = ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
       "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him as only \" the witness \" .\r\n"
       "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 . \r\n"
       "1\t1330381\t1330521\tThey had published .\tOn Tuesday they published .\r\n")
DEV_IDS = "2108705\t2108831\r\n"


def test_mrpc_split_as_glue_makes_it():
    """GLUE's download_glue_data.py: the header as it is (byte-order mark kept), the rows stripped and
    tab-joined, Unix newlines; the dev ids go to dev.tsv, the rest to train.tsv."""
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    assert data.mrpc_split(MSR, DEV_IDS, "dev").decode("utf-8") == \
        header + "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .\n"
    assert data.mrpc_split(MSR, DEV_IDS, "train").decode("utf-8") == (
        header + "1\t702876\t702977\tAmrozi accused his brother .\t"
        "Referring to him as only \" the witness \" .\n"
        "1\t1330381\t1330521\tThey had published .\tOn Tuesday they published .\n")


def test_fetch_from_the_public_homes_unpacks_zip_members_and_splits_mrpc(server, tmp_path, monkeypatch):
    """Sources as in FILES: a URL, a member of a zip (checked: the zip, then the member), GLUE's MRPC split.
    The archives are downloaded once each and not kept."""
    folder, url, log, _ = server
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("CB/train.jsonl", b'{"idx": 0}\n')
        z.writestr("CB/val.jsonl", b'{"idx": 1}\n')
    put(folder, "CB.zip", zipped.getvalue())
    put(folder, "msr.txt", MSR.encode("utf-8"))
    put(folder, "ids.tsv", DEV_IDS.encode("utf-8"))
    put(folder, "hub/spiece.model", b"vocab")
    monkeypatch.setattr(data, "ARCHIVES", {
        "superglue/CB.zip": (url + "/CB.zip", len(zipped.getvalue()), sha(zipped.getvalue())),
        "glue/msr_paraphrase_train.txt": (url + "/msr.txt", 0, sha(MSR.encode("utf-8"))),
        "glue/mrpc_dev_ids.tsv": (url + "/ids.tsv", 0, sha(DEV_IDS.encode("utf-8")))})
    want = {"t5_spiece.model": (url + "/hub/spiece.model", b"vocab"),
            "superglue/CB/train.jsonl": ("superglue/CB.zip:CB/train.jsonl", b'{"idx": 0}\n'),
            "superglue/CB/val.jsonl": ("superglue/CB.zip:CB/val.jsonl", b'{"idx": 1}\n'),
            "glue/MRPC/dev.tsv": ("mrpc:dev", data.mrpc_split(MSR, DEV_IDS, "dev")),
            "glue/MRPC/train.tsv": ("mrpc:train", data.mrpc_split(MSR, DEV_IDS, "train"))}
    monkeypatch.setattr(data, "FILES", [(p, src, len(b), sha(b)) for p, (src, b) in want.items()])
    monkeypatch.delenv("SPOT_DATA_MIRROR", raising=False)
    root = data.fetch(root=tmp_path / "cache")
    assert cached(root) == sorted(want)
    assert all((root / p).read_bytes() == b for p, (_, b) in want.items())
    assert sorted(log) == ["/CB.zip", "/hub/spiece.model", "/ids.tsv", "/msr.txt"]

    # A member whose bytes are not the table's: named, with its archive's URL and both hashes.
    (root / "superglue/CB/val.jsonl").unlink()
    monkeypatch.setattr(data, "FILES", [(p, s, n, "0" * 64 if p.endswith("val.jsonl") else h)
                                        for p, s, n, h in data.FILES])
    with pytest.raises(data.FetchError) as e:
        data.fetch(root=root)
    assert str(e.value) == (f"superglue/CB/val.jsonl (CB/val.jsonl of {url}/CB.zip): sha256 "
                            f"{sha(want['superglue/CB/val.jsonl'][1])}, expected {'0' * 64}; "
                            "nothing was saved")
    assert "superglue/CB/val.jsonl" not in cached(root)

    # An archive whose bytes are not tfds's checksum: nothing unpacked from it.
    for p in ("superglue/CB/train.jsonl", "glue/MRPC/dev.tsv"):
        (root / p).unlink()
    put(folder, "CB.zip", zipped.getvalue() + b"\0")
    with pytest.raises(data.FetchError, match=rf"superglue/CB.zip from {url}/CB.zip: sha256 [0-9a-f]{{64}}, "
                                              rf"expected {sha(zipped.getvalue())}"):
        data.fetch(["superglue"], root=root)
    assert cached(root) == ["glue/MRPC/train.tsv", "t5_spiece.model"]


# ----------------------------------------------------------------------------- the cache and the table
def test_cache_folder_follows_spot_data_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SPOT_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert data.data_root() == tmp_path / "home" / ".cache" / "spot-jax" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.data_root() == tmp_path / "xdg" / "spot-jax" / "data"
    monkeypatch.setenv("SPOT_DATA", str(tmp_path / "mine"))
    assert data.data_root() == tmp_path / "mine"


def test_the_table_is_every_shared_file_with_its_size_and_sha256(shared_data):
    """FILES lists exactly the files of the data folder (PROVENANCE.md aside), each with its bytes' size and
    sha256; every archive member and MRPC source is in ARCHIVES."""
    on_disk = sorted(str(p.relative_to(shared_data)) for p in shared_data.rglob("*")
                     if p.is_file() and p.name != "PROVENANCE.md")
    assert sorted(r[0] for r in data.FILES) == on_disk
    assert data.missing(root=shared_data) == []
    for path, source, size, digest in data.FILES:
        assert source.startswith("https://") or source.startswith("mrpc:") or \
            source.split(":")[0] in data.ARCHIVES, path
    assert all(url.startswith("https://") and len(h) == 64 for url, _, h in data.ARCHIVES.values())


def test_tests_skip_naming_the_fetch_command_without_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOT_DATA", str(tmp_path / "cache"))
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("SPOT_DATA_MIRROR", f"http://127.0.0.1:{s.getsockname()[1]}")
    folder, why = find_data(tmp_path / "no-shared")
    assert folder is None and "`python3 data.py fetch`" in why and str(tmp_path / "cache") in why
    assert find_data(tmp_path) == (tmp_path, None)


def test_tests_fetch_the_cache_from_a_mirror(mirror, tmp_path, monkeypatch):
    url, log, _ = mirror
    monkeypatch.setenv("SPOT_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("SPOT_DATA_MIRROR", url)
    assert find_data(tmp_path / "no-shared") == (tmp_path / "cache", None)
    assert find_data(tmp_path / "no-shared") == (tmp_path / "cache", None) and len(log) == len(FILES)
