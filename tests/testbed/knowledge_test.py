"""Tests of the knowledge-fusion testbed (fusionjax.testbed.knowledge)."""

import numpy as np
import pytest

from fusionjax.testbed import _knowledge
from fusionjax.testbed import knowledge


def test_each_teacher_is_best_on_its_own_corpus_and_beats_the_base(knowledge_tables):
    own = {"bpe[code]": "code", "bpe[docs]": "docs", "byte": "general"}
    for seed, table in knowledge_tables.items():
        for name, corpus in own.items():
            others = [table[m][corpus] for m in own if m != name]
            assert table[name][corpus] < min(others), (seed, name, corpus, table)
            assert table[name][corpus] < table["base"][corpus] - 0.05, (seed, name, table)


def test_tokenization_is_lossless_and_vocabularies_differ(knowledge_testbeds):
    tb = knowledge_testbeds[0]
    sizes = {d: t.tokenizer.get_vocab_size() for d, t in tb.teachers.items()}
    assert sizes == {"code": 512, "docs": 1024}
    windows = np.concatenate([w[:16] for w in tb.heldout.values()])
    windows[0, 10] = 0xC3  # a stray UTF-8 lead byte inside a window
    for teacher in tb.teachers.values():
        for row in windows:
            tokens = teacher.encode(row)
            data = b"".join(
                bytes(teacher.vocab.bytes[t, : teacher.vocab.lengths[t]].astype(np.uint8))
                for t in tokens
            )
            assert data == bytes(row.astype(np.uint8))
            assert len(tokens) < len(row)  # BPE merges bytes


def test_byte_targets_are_distributions_over_bytes(knowledge_testbeds):
    tb = knowledge_testbeds[0]
    windows = tb.heldout["code"][:32]
    for name in tb.teacher_names():
        out = tb.byte_targets(name, windows, k=8)
        ids, lps, where = out.targets.ids, out.targets.log_probs, out.where
        assert ids.shape == (32, 64, 8) and where.shape == (32, 64)
        assert not where[:, -1].any()
        assert where.mean() > 0.5, (name, where.mean())
        mass = np.exp(lps[where]).sum(-1)
        assert np.all(mass <= 1 + 1e-5) and np.mean(mass) > 0.75, (name, mass.mean())  # measured 0.86
        assert np.all((ids[where] >= -1) & (ids[where] < 256))
        # The gold next byte is most often among the top 8 of a teacher better than chance.
        gold = windows[:, 1:]
        hit = (ids[:, :-1] == gold[..., None]).any(-1)[where[:, :-1]]
        assert hit.mean() > 0.5, (name, hit.mean())  # measured >= 0.58


def test_bad_names_and_configs():
    with pytest.raises(TypeError, match="config"):
        knowledge.load(config="small")
    with pytest.raises(ValueError, match="name"):
        _knowledge._domain_of("bpe[math]")
