"""hotcold.engine.gguf_file: identical to gguf-py's reader on real files, and safe on broken ones."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotcold.convert import convert
from hotcold.engine.gguf_file import GGUFError, GGUFFile

TRAINED = Path(__file__).resolve().parents[1] / "models" / "mixtral-trained"


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    return convert(TRAINED, out, type="q4_k", expert_type="q8_0", cold_type=None, progress=False).path


def test_matches_gguf_py_reader(small_gguf: Path) -> None:
    ours, theirs = GGUFFile(small_gguf), gguf.GGUFReader(small_gguf)
    assert set(ours.tensors) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        ref = ours.tensors[t.name]
        assert ref.qtype == t.tensor_type and ref.shape == tuple(int(d) for d in reversed(t.shape))
        assert ours.raw(t.name).tobytes() == t.data.tobytes()
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == pytest.approx(field.contents()), key


def test_tensors_are_views_not_copies(small_gguf: Path) -> None:
    f = GGUFFile(small_gguf)
    w = f.raw("blk.0.ffn_down_exps.weight")
    assert not w.flags.owndata and not w.flags.writeable


@pytest.mark.parametrize("cut", [0, 3, 23, 100, 1000, 20000, -1])
def test_truncated_files_raise(small_gguf: Path, tmp_path: Path, cut: int) -> None:
    data = small_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:-1000])
    with pytest.raises(GGUFError, match="bad.gguf"):
        GGUFFile(bad)


def test_not_gguf_and_missing(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(p)
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "missing.gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few KB with every value kind (strings, numeric and string arrays) and three tensors."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_token_list(["<unk>", "a", "bb", "ccc"])
    w.add_token_scores([0.0, -1.0, -2.0, -3.0])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_string("test.text", "hello")
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", np.zeros((4, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c", np.ones(8, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_file_parses(tiny_gguf: Path) -> None:
    f = GGUFFile(tiny_gguf)
    assert [a.tolist() for a in f.metadata["test.nested"]] == [[1, 2], [3]] and f.metadata["tokenizer.ggml.tokens"][3] == "ccc"
    assert f.tensors["b"].shape == (4, 32) and np.array_equal(f.raw("a").view(np.float32).ravel(), np.arange(64))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_headers_raise_gguf_error_or_parse(tiny_gguf: Path, tmp_path: Path, data: st.DataObject) -> None:
    # Hostile edits in the header, metadata and tensor-info region: any outcome but a clean parse
    # or GGUFError (a crash, MemoryError, hang, other exception) fails the test.
    raw = bytearray(tiny_gguf.read_bytes())
    head = GGUFFile(tiny_gguf).data_offset
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, head - 1))
        width = data.draw(st.sampled_from([1, 4, 8]))
        raw[at:at + width] = data.draw(st.binary(min_size=width, max_size=width))
    bad = tmp_path / "fuzz.gguf"
    bad.write_bytes(bytes(raw))
    try:
        f = GGUFFile(bad)
    except GGUFError:
        return
    for name in f.tensors:
        assert f.raw(name).size == f.tensors[name].nbytes
