"""Bundles are untrusted input (issue 22): nothing outside a bundle is read, and exports replace only what edgevlm
wrote. One test per escape form (``..``, absolute, symlinked file, symlinked directory, ONNX external data, an
unlisted file), for classification and VLM bundles; the output-path rules of ``--overwrite``; killed exports."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgevlm import runtime
from edgevlm.bundle import MANIFEST, file_table, onnx_external_locations, resolve
from edgevlm.cli import main
from edgevlm.errors import BundleError, ConfigError, EdgeVLMError

pytestmark = pytest.mark.usefixtures("no_writes_outside")   # see tests/conftest.py


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clf_bundle(tmp_path_factory):
    from edgevlm.build import export_bundle
    from edgevlm.config import ExportConfig, QuantConfig

    out = tmp_path_factory.mktemp("clf") / "fastvit"
    export_bundle(ExportConfig(model="fastvit_t8", target="cpu", quant=QuantConfig(precision="fp32"), out=out,
                               validate_accuracy=False), quiet=True)
    return out


@pytest.fixture(scope="module")
def vlm_bundle(tmp_path_factory):
    from edgevlm.build_vlm import VLMExportConfig, export_vlm_bundle

    out = tmp_path_factory.mktemp("vlm") / "scenes"
    export_vlm_bundle(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", precision="fp32", out=str(out),
                                      parity_tokens=4), quiet=True)
    return out


def _copy(src: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the bundle, a folder beside it that plays 'outside')."""
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    outside = tmp_path / "outside"
    outside.mkdir()
    return dst, outside


def _edit(bundle: Path, fn, refresh_files: bool = False) -> dict:
    m = json.loads((bundle / MANIFEST).read_text())
    fn(m)
    if refresh_files:
        m["files"] = file_table(bundle)
    (bundle / MANIFEST).write_text(json.dumps(m))
    return m


def _refused(bundle: Path, match: str, verify: bool = True):
    with pytest.raises(BundleError, match=match):
        runtime.load(bundle, verify=verify)


def _atime_tracked(folder: Path) -> bool:
    """Whether reads update access times here (relatime does once atime is older than mtime; noatime never)."""
    probe = folder / ".probe"
    probe.write_bytes(b"x")
    st = probe.stat()
    os.utime(probe, ns=(st.st_mtime_ns - 3 * 86400 * 10**9, st.st_mtime_ns))
    before = probe.stat().st_atime_ns
    probe.read_bytes()
    tracked = probe.stat().st_atime_ns != before
    probe.unlink()
    return tracked


def _snapshot(folder: Path) -> dict:
    """Size, modification and access time of every file under ``folder``; access times are first set back three
    days, so any later read of a file changes its snapshot (where the file system tracks access times)."""
    track = _atime_tracked(folder)
    snap = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            if track:
                os.utime(p, ns=(st.st_mtime_ns - 3 * 86400 * 10**9, st.st_mtime_ns))
            snap[p.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns, p.stat().st_atime_ns)
    return snap


def _unchanged(folder: Path, before: dict) -> bool:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_atime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()} == before


def test_the_outside_check_sees_a_read(tmp_path):
    """The guard the escape tests use can fail: reading one file outside changes its snapshot."""
    (tmp_path / "secret").write_bytes(b"x" * 10)
    if not _atime_tracked(tmp_path):
        pytest.skip("this file system does not record access times (noatime); the checks fall back to size/mtime")
    before = _snapshot(tmp_path)
    assert _unchanged(tmp_path, before)
    (tmp_path / "secret").read_bytes()
    assert not _unchanged(tmp_path, before)


def test_the_write_guard_sees_a_write_outside_and_a_sentinel_read(tmp_path):
    """The corpus-wide guard (tests/conftest.py) can fail: it records a write outside the temp folder and a read
    of the escape tests' absolute-path target."""
    import conftest

    saved = conftest._AUDIT["allowed"], list(conftest._AUDIT["bad"])
    conftest._AUDIT["allowed"], conftest._AUDIT["bad"] = (str(tmp_path),), []
    try:
        try:
            open("/etc/hostname", "rb").close()
        except OSError:
            pass
        with open(tmp_path / "fine.txt", "w") as f:
            f.write("x")
        try:
            open("/proc/self/edgevlm-guard-probe", "w")      # refused by the kernel, but seen first
        except OSError:
            pass
        bad = list(conftest._AUDIT["bad"])
    finally:
        conftest._AUDIT["allowed"], conftest._AUDIT["bad"] = saved
    assert bad == ["read /etc/hostname", "wrote /proc/self/edgevlm-guard-probe"]


# -- escapes: classification bundles ---------------------------------------------------------------------------
def _set_artifact(path):
    def fn(m):
        m["artifacts"][0]["path"] = path
    return fn


def test_artifact_dotdot_path_is_refused(clf_bundle, tmp_path):
    b, outside = _copy(clf_bundle, tmp_path)
    shutil.copy(b / "model.onnx", outside / "model.onnx")
    _edit(b, _set_artifact("../outside/model.onnx"))
    before = _snapshot(outside)
    _refused(b, r"'\.\./outside/model\.onnx'.*outside the bundle", verify=False)
    _refused(b, "outside the bundle")
    assert _unchanged(outside, before), "a file outside the bundle was read or changed"


def test_artifact_absolute_path_is_refused(clf_bundle, tmp_path):
    b, outside = _copy(clf_bundle, tmp_path)
    shutil.copy(b / "model.onnx", outside / "model.onnx")
    _edit(b, _set_artifact(str(outside / "model.onnx")))
    before = _snapshot(outside)
    _refused(b, "outside the bundle", verify=False)
    assert _unchanged(outside, before), "a file outside the bundle was read or changed"
    _edit(b, _set_artifact("/etc/hostname"))
    _refused(b, "'/etc/hostname'.*outside the bundle", verify=False)


def test_symlinked_artifact_file_is_refused(clf_bundle, tmp_path):
    b, outside = _copy(clf_bundle, tmp_path)
    shutil.move(b / "model.onnx", outside / "model.onnx")
    (b / "model.onnx").symlink_to(outside / "model.onnx")
    before = _snapshot(outside)
    _refused(b, "symbolic link")                       # verify refuses links anywhere in the bundle
    _refused(b, r"passes through a symbolic link", verify=False)
    assert _unchanged(outside, before), "a file outside the bundle was read or changed"


def test_symlinked_directory_is_refused(clf_bundle, tmp_path):
    b, outside = _copy(clf_bundle, tmp_path)
    shutil.copy(b / "model.onnx", outside / "model.onnx")
    (b / "sub").symlink_to(outside, target_is_directory=True)
    _edit(b, _set_artifact("sub/model.onnx"))
    before = _snapshot(outside)
    _refused(b, "symbolic link")
    _refused(b, r"passes through a symbolic link \(.*sub\)", verify=False)
    assert _unchanged(outside, before), "a file outside the bundle was read or changed"


def test_unlisted_file_is_refused_without_verify(clf_bundle, tmp_path):
    b, _ = _copy(clf_bundle, tmp_path)
    shutil.copy(b / "model.onnx", b / "other.onnx")
    _edit(b, _set_artifact("other.onnx"))
    _refused(b, "not listed in the manifest's files", verify=False)
    _refused(b, "does not list: other.onnx")


def _external_graph(folder: Path, location: str, data_dir: Path | None = None) -> Path:
    """A tiny graph (Y = X + W) whose W lives in external data at ``location`` (written under ``data_dir``)."""
    w = np.arange(4, dtype=np.float32)
    t = onnx.numpy_helper.from_array(w, "W")
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    (data_dir or folder).joinpath(Path(location).name).write_bytes(w.tobytes())
    x = onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 4])
    g = onnx.helper.make_graph([onnx.helper.make_node("Add", ["pixel_values", "W"], ["logits"])], "g", [x], [y], [t])
    path = folder / "model.onnx"
    path.write_bytes(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]).SerializeToString())
    return path


@pytest.mark.parametrize("where", ["dotdot", "absolute", "unlisted", "symlink"])
def test_external_data_outside_the_bundle_is_refused(clf_bundle, tmp_path, where):
    b, outside = _copy(clf_bundle, tmp_path)
    (b / "model.onnx").unlink()
    location = {"dotdot": "../outside/w.bin", "absolute": str(outside / "w.bin")}.get(where, "w.bin")
    _external_graph(b, location, data_dir=b if where == "unlisted" else outside)
    if where == "symlink":
        (b / "w.bin").symlink_to(outside / "w.bin")
    files = {n: {"sha256": "0" * 64, "size": 0} for n in ("model.onnx", "w.bin") if where != "unlisted" or n != "w.bin"}
    _edit(b, lambda m: m.update(files=files))
    match = {"dotdot": "'../outside/w.bin', outside the bundle", "absolute": "outside the bundle",
             "unlisted": "external data of model.onnx path 'w.bin'.*not listed", "symlink": "symbolic link"}[where]
    before = _snapshot(outside)
    _refused(b, match, verify=False)
    assert _unchanged(outside, before), "a file outside the bundle was read or changed"


def test_external_data_inside_the_bundle_runs(clf_bundle, tmp_path):
    """The containment check does not get in the way of a legitimate graph with its weights beside it."""
    b, _ = _copy(clf_bundle, tmp_path)
    (b / "model.onnx").unlink()
    _external_graph(b, "w.bin")
    _edit(b, lambda m: m["artifacts"][0].update(precision="fp32"), refresh_files=True)
    assert onnx_external_locations(b / "model.onnx") == ["w.bin"]
    sess = runtime.load(b).session
    out = sess.run(np.ones((1, 4), np.float32))
    np.testing.assert_array_equal(out, np.arange(4, dtype=np.float32)[None] + 1)


def test_external_locations_match_onnx(tmp_path):
    """The wire-format scan finds what onnx's own loader would follow, in initializers and subgraph attributes."""
    _external_graph(tmp_path, "w.bin")
    m = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    inner = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["W"], ["o"])], "inner", [],
                                   [onnx.helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [4])],
                                   [onnx.TensorProto.FromString(m.graph.initializer[0].SerializeToString())])
    inner.initializer[0].external_data[0].value = "sub/w2.bin"
    cond = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    m.graph.input.append(cond)
    m.graph.node.append(onnx.helper.make_node("If", ["c"], ["z"], then_branch=inner, else_branch=inner))
    (tmp_path / "two.onnx").write_bytes(m.SerializeToString())
    assert sorted(onnx_external_locations(tmp_path / "two.onnx")) == ["sub/w2.bin", "sub/w2.bin", "w.bin"]
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 40)
    with pytest.raises(BundleError, match="not a valid ONNX graph"):
        onnx_external_locations(tmp_path / "junk.onnx")


# -- escapes: VLM bundles (parts, the tokenizer) ---------------------------------------------------------------
@pytest.mark.parametrize("field", ["decoder", "vision_encoder", "embed_tokens", "tokenizer"])
@pytest.mark.parametrize("form", ["dotdot", "absolute", "symlink_file", "symlink_dir"])
def test_vlm_paths_cannot_leave_the_bundle(vlm_bundle, tmp_path, field, form):
    b, outside = _copy(vlm_bundle, tmp_path)
    m = json.loads((b / MANIFEST).read_text())
    name = m["generation"]["tokenizer"] if field == "tokenizer" else m["parts"][field]["path"]
    shutil.copy(b / name, outside / Path(name).name)
    new = {"dotdot": f"../outside/{Path(name).name}", "absolute": str(outside / Path(name).name),
           "symlink_file": f"link-{Path(name).name}", "symlink_dir": f"sub/{Path(name).name}"}[form]
    if form == "symlink_file":
        (b / new).symlink_to(outside / Path(name).name)
    elif form == "symlink_dir":
        (b / "sub").symlink_to(outside, target_is_directory=True)

    def point(m):
        if field == "tokenizer":
            m["generation"]["tokenizer"] = new
        else:
            m["parts"][field]["path"] = new
    _edit(b, point)
    before = _snapshot(outside)
    match = "symbolic link" if form.startswith("symlink") else "outside the bundle"
    _refused(b, match, verify=False)
    assert _unchanged(outside, before), "a file outside the bundle was read or changed"


def test_vlm_cli_refuses_with_one_line_and_exit_2(vlm_bundle, tmp_path, capsys):
    b, outside = _copy(vlm_bundle, tmp_path)
    _edit(b, lambda m: m["generation"].update(tokenizer="/etc/hostname"))
    code = main(["run", str(b), "--prompt", "how many circles?"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "/etc/hostname" in err


def test_corrupt_tokenizer_with_a_matching_checksum_is_an_edgevlm_error(vlm_bundle, tmp_path):
    b, _ = _copy(vlm_bundle, tmp_path)
    (b / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    _edit(b, lambda m: None, refresh_files=True)
    _refused(b, "tokenizer.json is not a tokenizer")


def test_resolve_accepts_a_listed_file_and_rejects_odd_names(vlm_bundle):
    m = json.loads((vlm_bundle / MANIFEST).read_text())
    assert resolve(vlm_bundle, m, "tokenizer.json", "t") == vlm_bundle / "tokenizer.json"
    for bad in ("", ".", "a\\..\\b", "a\x00b", 3, None, "./../x"):
        with pytest.raises(BundleError):
            resolve(vlm_bundle, m, bad, "t")


def test_special_file_in_a_bundle_is_refused_without_reading_it(clf_bundle, tmp_path):
    b, _ = _copy(clf_bundle, tmp_path)
    os.mkfifo(b / "pipe")                     # reading it would block: verify must refuse before opening it
    _refused(b, "not a regular file")


# -- output paths and --overwrite ------------------------------------------------------------------------------
def _vlm_export(out, overwrite=False, **kw):
    from edgevlm.build_vlm import VLMExportConfig, export_vlm_bundle

    return export_vlm_bundle(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", precision="fp32",
                                             out=str(out), overwrite=overwrite, parity_tokens=2, **kw), quiet=True)


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the export gets as far as loading the model."""
    import edgevlm.modeling.families as families

    def boom(*a, **k):
        raise AssertionError("the export started work before refusing its output path")
    monkeypatch.setattr(families, "load_vlm", boom)


def test_overwrite_refuses_a_directory_that_is_not_a_bundle(tmp_path, no_work):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"not an edgevlm bundle \(holiday\.jpg\)"):
        _vlm_export(d, overwrite=True)
    assert (d / "holiday.jpg").read_bytes() == b"mine"


def test_overwrite_refuses_a_regular_file(tmp_path, no_work):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(ConfigError, match="existing file"):
        _vlm_export(f, overwrite=True)
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("case", ["dot", "root", "home", "under_a_file", "link"])
def test_bad_output_paths_are_refused_before_work(tmp_path, monkeypatch, no_work, case):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "target").mkdir()
    out = {"dot": ".", "root": "/", "home": str(tmp_path / "home"), "under_a_file": "file/bundle",
           "link": "alias"}[case]
    if case == "link":
        (tmp_path / "alias").symlink_to(tmp_path / "target", target_is_directory=True)
    with pytest.raises(EdgeVLMError):
        _vlm_export(out, overwrite=True)


def test_cli_refuses_out_under_a_file_in_one_line(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    code = main(["export", "--model", "edgevlm_scenes_tiny", "--weights", "random", "--out",
                 str(tmp_path / "file" / "b"), "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is a file, not a directory" in err


def test_overwrite_replaces_a_bundle_or_an_empty_directory_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        empty = tmp_path / "empty"
        empty.mkdir()
        out, m = _vlm_export(empty, overwrite=True)
        assert (out / MANIFEST).is_file() and (os.stat(out).st_mode & 0o777) == 0o755
        (out / "stale-note.txt").write_text("x")                 # still a bundle (it has a manifest): replaced
        out, m = _vlm_export(empty, overwrite=True)
        assert not (out / "stale-note.txt").exists() and (out / MANIFEST).is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]    # no staging or old copy left
    finally:
        os.umask(old)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_and_scratch_of_ended_processes_are_removed(tmp_path, monkeypatch):
    from edgevlm import scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    dead = _dead_pid()
    out = tmp_path / "out" / "b"
    out.parent.mkdir()
    stale = out.parent / f".b.edgevlm-staging.{dead}.abcd"
    alive = out.parent / f".b.edgevlm-staging.{os.getppid()}.efgh"     # a running process's: kept
    stale_scratch = scratch.root() / f"vlm.{dead}.xyz"
    for d in (stale, alive, stale_scratch):
        d.mkdir()
        (d / "part.onnx").write_bytes(b"half")
    _vlm_export(out)
    assert not stale.exists() and alive.exists() and not stale_scratch.exists()
    assert [p.name for p in scratch.root().iterdir()] == []          # the export's own scratch went too


KILL_SCRIPT = """
import sys
from edgevlm.build_vlm import VLMExportConfig, export_vlm_bundle
export_vlm_bundle(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", precision="int8", out=sys.argv[1],
                                  calib_size=64, parity_tokens=8), quiet=True)
"""


def test_a_killed_export_is_cleaned_up_by_the_next(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], env=env)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if any(x.name.startswith(".b.edgevlm-staging.") for x in tmp_path.iterdir()):
            break
        time.sleep(0.05)
    assert p.poll() is None, "the export finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists()                                           # never a half bundle at the output path
    left = [x.name for x in tmp_path.iterdir() if x.name.startswith(".b.")]
    assert left, "the staging directory of the killed export should still be there before the next run"
    subprocess.run([sys.executable, "-c", KILL_SCRIPT.replace('"int8"', '"fp32"'), str(out)], env=env, check=True,
                   timeout=600)
    assert (out / MANIFEST).is_file()
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".b.")] == []
    scratch_root = tmp_path / "tmp" / f"edgevlm-{os.getuid()}"
    assert not scratch_root.exists() or list(scratch_root.iterdir()) == []


@pytest.mark.parametrize("part,other", [("embed_tokens", "vision_encoder"), ("vision_encoder", "embed_tokens"),
                                        ("decoder", "embed_tokens")])
def test_a_graph_of_the_wrong_kind_in_a_parts_place_is_refused(vlm_bundle, tmp_path, part, other):
    b, _ = _copy(vlm_bundle, tmp_path)
    _edit(b, lambda m: m["parts"][part].update(path=m["parts"][other]["path"]))
    _refused(b, "is not (the graph this part needs|a decoder)")


@pytest.mark.parametrize("argv, flag", [
    (["--model", "edgevlm_scenes_tiny", "--num-classes", "10"], "--num-classes"),
    (["--model", "edgevlm_scenes_tiny", "--img-size", "64"], "--img-size"),
    (["--model", "edgevlm_scenes_tiny", "--calib-method", "entropy"], "--calib-method"),
    (["--model", "edgevlm_scenes_tiny", "--no-accuracy"], "--no-accuracy"),
    (["--model", "fastvit_t8", "--decoder", "gguf"], "--decoder"),
    (["--model", "fastvit_t8", "--revision", "2025-01-09"], "--revision"),
])
def test_export_flags_of_the_other_model_kind_are_refused(tmp_path, capsys, argv, flag):
    code = main(["export", *argv, "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flag in err and "does not apply" in err
    assert not (tmp_path / "b").exists()
