"""Vocabulary alignment: tokenizer files in, embedding rows permuted into one vocabulary.

Most tokenizer files are written by the tests as JSON in Hugging Face's formats (edge
cases: added tokens, bad ids); one test trains real BPE tokenizers with `tokenizers`. Each model's matrix is built from one table of
per-token vectors, so a shared token must come out with bit-identical rows.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fusionjax.io._vocab import align_embeddings
from fusionjax.io._vocab import align_vocabs
from fusionjax.io._vocab import read_vocab

D = 4


def write_tokenizer_json(path, tokens, *, added=()):
    """A BPE tokenizer.json: `tokens` in model.vocab, `added` as added_tokens after them."""
    data = {
        "version": "1.0",
        "added_tokens": [
            {"id": len(tokens) + i, "content": t, "special": True, "single_word": False,
             "lstrip": False, "rstrip": False, "normalized": False}
            for i, t in enumerate(added)
        ],
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []},
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_vocab_json(path, tokens):
    path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    return path


def table(tokens, seed=0, dtype=np.float32):
    """One vector per token, the same for a token in every model (seeded by the token)."""
    return {t: np.random.default_rng([seed, sum(map(ord, t)), len(t)]).standard_normal(D).astype(dtype) for t in tokens}


def matrix(tokens, vectors):
    return np.stack([vectors[t] for t in tokens])


BASE = ["<s>", "a", "b", "c", "d", "e"]
M1 = ["<s>", "c", "a", "e", "d", "b", "x", "y"]  # permuted, plus x, y
M2 = ["<s>", "b", "a", "d", "z"]  # lacks c and e, adds z


def test_read_vocab_formats(tmp_path):
    tj = write_tokenizer_json(tmp_path / "tokenizer.json", ["a", "b", "c"], added=["<|eot|>"])
    assert read_vocab(tj) == ("a", "b", "c", "<|eot|>")
    assert read_vocab(tmp_path) == ("a", "b", "c", "<|eot|>")  # the directory
    (tmp_path / "g").mkdir()
    write_vocab_json(tmp_path / "g" / "vocab.json", ["x", "y"])
    (tmp_path / "g" / "added_tokens.json").write_text(json.dumps({"<pad>": 2}))
    assert read_vocab(tmp_path / "g") == ("x", "y", "<pad>")
    uni = {"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["▁a", -1.5], ["▁b", -2.0]]}}
    (tmp_path / "u.json").write_text(json.dumps(uni))
    assert read_vocab(tmp_path / "u.json") == ("<unk>", "▁a", "▁b")
    # Special tokens listed both in the vocab and in added_tokens, with their ids, are fine.
    data = json.loads(tj.read_text())
    data["added_tokens"].append({"id": 0, "content": "a"})
    tj.write_text(json.dumps(data))
    assert read_vocab(tj) == ("a", "b", "c", "<|eot|>")


def test_read_vocab_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.json"):
        read_vocab(tmp_path)
    bad = tmp_path / "holes.json"
    bad.write_text(json.dumps({"a": 0, "b": 2}))
    with pytest.raises(ValueError, match=r"holes\.json: token ids are not contiguous: 1 of 0\.\.2 have no token \(the first is 1\)"):
        read_vocab(bad)
    bad.write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 1, "content": "c"}]}))
    with pytest.raises(ValueError, match=r"holes\.json: id 1 is both 'b' and 'c'"):
        read_vocab(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holes\.json: expected a tokenizer\.json"):
        read_vocab(bad)


def test_union_vocab_and_index_maps(tmp_path):
    files = [write_tokenizer_json(tmp_path / f"t{i}.json", v) for i, v in enumerate([BASE, M1, M2])]
    out = align_vocabs(files)
    assert out.vocab == ("<s>", "a", "b", "c", "d", "e", "x", "y", "z")
    assert out.sizes == [6, 8, 5] and out.sources == [str(f) for f in files]
    for v, index in zip([BASE, M1, M2], out.index, strict=True):
        for j, t in enumerate(out.vocab):
            assert index[j] == (v.index(t) if t in v else -1)
    # Another base puts its own tokens first.
    assert align_vocabs([BASE, M1, M2], base=2).vocab[:5] == tuple(M2)
    assert align_vocabs([BASE, M1, M2], target="base").vocab == tuple(BASE)


@pytest.mark.parametrize("fill", ["base", "mean"])
def test_shared_rows_identical_and_missing_rows_filled(tmp_path, fill):
    vec = table(set(BASE + M1 + M2))
    mats = [matrix(v, vec) for v in (BASE, M1, M2)]
    # Make each model's rows its own: shared tokens differ across models by a per-model
    # offset, so fills are distinguishable from copies.
    mats = [m + np.float32(10 * k) for k, m in enumerate(mats)]
    files = [write_vocab_json(tmp_path / f"v{i}.json", v) for i, v in enumerate([BASE, M1, M2])]
    out = align_embeddings(mats, files, fill=fill)
    vocab = out.vocab
    for k, v in enumerate([BASE, M1, M2]):
        got = np.asarray(out.matrices[k])
        assert got.shape == (len(vocab), D) and got.dtype == np.float32
        for j, t in enumerate(vocab):
            have = [m for m, vv in enumerate([BASE, M1, M2]) if t in vv]
            if t in v:  # an exact copy of the model's own row
                assert got[j].tobytes() == mats[k][v.index(t)].tobytes(), (k, t)
                assert not out.filled[k][j] and out.index[k][j] == v.index(t)
            else:
                assert out.filled[k][j] and out.index[k][j] == -1
                mean = np.mean([mats[m][[BASE, M1, M2][m].index(t)] for m in have], axis=0)
                want = mats[0][BASE.index(t)] if fill == "base" and t in BASE else mean
                np.testing.assert_allclose(got[j], want, rtol=1e-6, atol=1e-6, err_msg=f"{k} {t}")
    # The base's rows keep their ids.
    assert np.asarray(out.matrices[0])[: len(BASE)].tobytes() == mats[0].tobytes()
    # Fill counts: model 1 lacks z; model 2 lacks c, e, x, y; the base lacks x, y, z.
    assert [int(f.sum()) for f in out.filled] == [3, 1, 4]


def test_target_base_keeps_only_the_base_vocabulary():
    vec = table(set(BASE + M1 + M2))
    mats = [matrix(v, vec) for v in (BASE, M1, M2)]
    out = align_embeddings(mats, [BASE, M1, M2], target="base")
    assert out.vocab == tuple(BASE)
    for k in range(3):
        got = np.asarray(out.matrices[k])
        for j, t in enumerate(BASE):  # shared vectors came from one table: all equal the base's
            np.testing.assert_array_equal(got[j], vec[t])
    assert out.filled[2].tolist() == [False, False, False, True, False, True]


def test_pytree_of_matrices_axis_and_bf16():
    vec = table(set(BASE + M1), dtype=ml_dtypes.bfloat16)
    trees = [{"embed": matrix(v, vec), "head_kernel": matrix(v, vec).T} for v in (BASE, M1)]
    rows = align_embeddings([{"e": t["embed"]} for t in trees], [BASE, M1])
    cols = align_embeddings([{"e": t["head_kernel"]} for t in trees], [BASE, M1], axis=1)
    for k in range(2):
        assert rows.matrices[k]["e"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(cols.matrices[k]["e"]), np.asarray(rows.matrices[k]["e"]).T)
    # An align_vocabs result is reused as it is.
    pre = align_vocabs([BASE, M1])
    again = align_embeddings([t["embed"] for t in trees], pre)
    np.testing.assert_array_equal(np.asarray(again.matrices[1]), np.asarray(rows.matrices[1]["e"]))


def test_works_under_jit_inputs_as_jax_arrays():
    vec = table(set(BASE + M2))
    mats = [jnp.asarray(matrix(v, vec)) for v in (BASE, M2)]
    out = align_embeddings(mats, [BASE, M2], fill="mean")
    assert isinstance(out.matrices[0], jax.Array)
    np.testing.assert_array_equal(np.asarray(out.matrices[1])[out.vocab.index("z")], vec["z"])


def test_mismatched_sizes_raise_naming_the_file(tmp_path):
    vec = table(set(BASE + M1))
    f0 = write_tokenizer_json(tmp_path / "base.json", BASE)
    f1 = write_tokenizer_json(tmp_path / "m1.json", M1)
    base = matrix(BASE, vec)
    padded = np.concatenate([matrix(M1, vec), np.full((3, D), 7.0, np.float32)])  # 8 tokens, 11 rows
    with pytest.raises(ValueError, match=r"m1\.json: the vocabulary has 8 tokens but the matrix of model 1 has 11 rows along axis 0; pass extra_rows='drop'"):
        align_embeddings([base, padded], [f0, f1])
    out = align_embeddings([base, padded], [f0, f1], extra_rows="drop")
    assert np.asarray(out.matrices[1]).shape == (8, D)
    assert not np.any(np.asarray(out.matrices[1]) == 7.0)  # the padding is gone
    with pytest.raises(ValueError, match=r"base\.json: the vocabulary has 6 tokens but \['embed'\] of model 0 has only 5 rows"):
        align_embeddings([{"embed": base[:5]}, {"embed": padded}], [f0, f1], extra_rows="drop")
    with pytest.raises(ValueError, match=r"differ beyond the token axis"):
        align_embeddings([base, matrix(M1, vec)[:, :2]], [f0, f1])
    with pytest.raises(ValueError, match=r"vocabs\[1\]: token 'a' has two ids"):
        align_vocabs([BASE, ["a", "b", "a"]])
    with pytest.raises(ValueError, match="fill must be"):
        align_embeddings([base], [BASE], fill="zeros")
    with pytest.raises(ValueError, match="base=3 is out of range"):
        align_vocabs([BASE], base=3)


def test_real_bpe_tokenizers_of_different_sizes(tmp_path):
    """Two BPE tokenizers trained with Hugging Face `tokenizers` on text that ships with Python."""
    import inspect
    import json as json_module
    from pydoc_data import topics

    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers

    corpora = [inspect.getsource(json_module.decoder), " ".join(list(topics.topics.values())[:40])]
    paths, ids = [], []
    for m, (text, size) in enumerate(zip(corpora, (300, 420), strict=True)):
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["[UNK]", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([text], trainer)
        (tmp_path / f"m{m}").mkdir()
        tok.save(str(tmp_path / f"m{m}" / "tokenizer.json"))
        ids.append(tok.get_vocab())
        paths.append(tmp_path / f"m{m}")
    vocabs = [read_vocab(p) for p in paths]
    for vocab, table_ in zip(vocabs, ids, strict=True):
        assert {t: i for i, t in enumerate(vocab)} == table_  # ids as the library assigns them
    assert len(vocabs[0]) != len(vocabs[1])
    rng = np.random.default_rng(0)
    emb = [rng.standard_normal((len(v), D)).astype(np.float32) for v in vocabs]
    out = align_embeddings(emb, paths)
    union = {t: i for i, t in enumerate(out.vocab)}
    assert out.vocab[: len(vocabs[0])] == tuple(vocabs[0])  # the base's ids are unchanged
    assert set(out.vocab) == set(vocabs[0]) | set(vocabs[1])
    for m, vocab in enumerate(vocabs):
        rows = np.asarray(out.matrices[m])
        for i, t in enumerate(vocab):  # every token keeps its own row in its model
            np.testing.assert_array_equal(rows[union[t]], emb[m][i])
    missing = [union[t] for t in set(vocabs[0]) - set(vocabs[1])]
    assert missing and np.asarray(out.filled[1])[missing].all()
    np.testing.assert_array_equal(np.asarray(out.matrices[1])[missing], emb[0][missing])
