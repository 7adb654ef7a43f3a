"""The fused loop: equal to decoding by hand, per-model prompts, stacking, stops, sampling, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax import decoding
from tests.decoding.conftest import VOCAB
from tests.decoding.conftest import first
from tests.decoding.conftest import hand_greedy
from tests.decoding.conftest import proxy
from tests.decoding.conftest import random_variables

N = 5
# Stop ids no model draws: runs that stop nowhere share the stop test's compiled loop.
NO_STOPS = dict(stop_tokens=(-1, -1), pad_token=-7)


def member(lms, name, prompt, lengths=None, stacked_names=None):
    model, _, variables = lms[name]
    if stacked_names:
        variables = fj.stack([lms[n][2] for n in stacked_names])
    return decoding.Member(
        model, variables, jnp.asarray(prompt, jnp.int32), lengths, stacked=bool(stacked_names)
    )


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return {
        "strong": rng.integers(1, VOCAB, (2, 5)),
        "expert": rng.integers(1, VOCAB, (2, 8)),  # a longer, "chat-formatted" prompt
        "base": rng.integers(1, VOCAB, (2, 8)),  # same width: tests share compiled loops
        "other": rng.integers(1, VOCAB, (2, 5)),
    }


def test_first_member_rule_equals_greedy_by_hand(lms, prompts):
    # proxy-tuning with alpha = 0 returns log_softmax(strong) exactly: s + 0 * shift == s.
    members = [member(lms, n, prompts[n]) for n in ("strong", "expert", "base")]
    out = decoding.generate(members, proxy, max_new_tokens=N, fuse_args=(jnp.float32(0.0),))
    _, module, variables = lms["strong"]
    np.testing.assert_array_equal(out.tokens, hand_greedy(module, variables, prompts["strong"], N))
    np.testing.assert_array_equal(out.lengths, [N, N])
    assert int(out.steps) == N and out.aux is None


def test_proxy_tuning_with_expert_equal_to_base_is_the_strong_model(lms, prompts):
    shared = prompts["expert"]
    members = [
        member(lms, "strong", prompts["strong"]),
        member(lms, "base", shared),
        member(lms, "base", shared),
    ]
    fused = decoding.generate(members, proxy, max_new_tokens=N, fuse_args=(jnp.float32(1.5),))
    alone = decoding.generate(members[:1], with_alpha, max_new_tokens=N, **NO_STOPS)
    np.testing.assert_array_equal(fused.tokens, alone.tokens)
    np.testing.assert_allclose(fused.token_log_probs, alone.token_log_probs, atol=1e-5)


def test_per_model_prompts_left_padded_equal_unpadded_single_rows(lms):
    # Every member has its own prompt length; row 1 is shorter than row 0 in each, so it is
    # left-padded by a different amount per member (3, 5 and 3 pads). Its batched tokens
    # must equal an unpadded run of row 1 alone (row 0 has no pads; a single run of it
    # would only cost one more compile). The padded widths (5, 8, 8) are the `prompts`
    # fixture's, so the batched run reuses the loop compiled for the other proxy tests.
    rng = np.random.default_rng(1)
    lengths = {"strong": [5, 2], "expert": [8, 3], "base": [8, 5]}
    rows = {n: [rng.integers(1, VOCAB, k) for k in ls] for n, ls in lengths.items()}

    def left_pad(seqs):
        width = max(len(s) for s in seqs)
        return np.stack([np.pad(s, (width - len(s), 0), constant_values=0) for s in seqs])

    names = ("strong", "expert", "base")
    alpha = (jnp.float32(1.0),)
    members = [member(lms, n, left_pad(rows[n]), jnp.asarray(lengths[n])) for n in names]
    batched = decoding.generate(members, proxy, max_new_tokens=N, fuse_args=alpha)
    single = [member(lms, n, rows[n][1][None]) for n in names]
    out = decoding.generate(single, proxy, max_new_tokens=N, fuse_args=alpha)
    np.testing.assert_array_equal(batched.tokens[1], out.tokens[0])
    np.testing.assert_allclose(batched.token_log_probs[1], out.token_log_probs[0], atol=1e-4)


def proxy_of_stacked(logits, alpha):
    """``proxy`` with expert and base stacked in one member (order-sensitive, unlike a mean)."""
    strong, pair = logits
    return proxy([strong, pair[0], pair[1]], alpha)


def test_stacked_experts_equal_separate_members(lms, prompts):
    # The separate members are the other proxy tests' ones (same shapes, same fuse): only
    # the stacked run compiles a new loop.
    names = ["expert", "base"]
    alpha = (jnp.float32(1.0),)
    strong = member(lms, "strong", prompts["strong"])
    stacked = member(lms, "expert", prompts["expert"], stacked_names=names)
    separate = [member(lms, n, prompts["expert"]) for n in names]
    a = decoding.generate([strong, stacked], proxy_of_stacked, max_new_tokens=N, fuse_args=alpha)
    b = decoding.generate([strong, *separate], proxy, max_new_tokens=N, fuse_args=alpha)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.token_log_probs, b.token_log_probs, atol=1e-5)


def with_alpha(logits):
    """The first member's log-probs, and a per-row 'alpha' trace as aux."""
    lp = jax.nn.log_softmax(logits[0])
    return lp, {"alpha": jnp.max(lp, axis=-1), "pair": jnp.stack([lp[:, 0], lp[:, 1]], axis=-1)}


def test_stop_tokens_end_rows_pad_the_rest_and_aux_is_recorded(lms, prompts):
    members = [member(lms, "strong", prompts["strong"])]
    # Two stop ids in every call: the values are traced, so the three calls share a program.
    free = decoding.generate(members, with_alpha, max_new_tokens=N, **NO_STOPS)
    stop = int(free.tokens[0, 2])
    out = decoding.generate(
        members, with_alpha, max_new_tokens=N, stop_tokens=(stop, -1), pad_token=-7
    )
    tokens, ref = np.asarray(out.tokens), np.asarray(free.tokens)
    for b in range(2):
        hits = np.flatnonzero(ref[b] == stop)
        end = hits[0] + 1 if hits.size else N
        np.testing.assert_array_equal(tokens[b, :end], ref[b, :end])
        assert np.all(tokens[b, end:] == -7)
        assert int(out.lengths[b]) == end and bool(out.stopped[b]) == bool(hits.size)
        assert np.all(np.asarray(out.aux["alpha"])[b, end:] == 0)
        np.testing.assert_allclose(out.aux["alpha"][b, :end], free.aux["alpha"][b, :end])
    assert out.aux["alpha"].shape == (2, N) and out.aux["pair"].shape == (2, N, 2)
    # Every row stopped: the loop ends early.
    both = decoding.generate(
        members,
        with_alpha,
        max_new_tokens=N,
        stop_tokens=tuple(int(t) for t in ref[:, 1]),
        pad_token=-7,
    )
    assert int(both.steps) <= 2 and np.all(np.asarray(both.tokens)[:, 2:] == -7)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(lms, prompts):
    members = [member(lms, n, prompts[n]) for n in ("strong", "expert", "base")]
    alpha = (jnp.float32(0.5),)
    kwargs = dict(max_new_tokens=N, fuse_args=alpha)
    hot = decoding.sampling(temperature=1.0, top_k=VOCAB, top_p=1.0)
    a = decoding.generate(members, proxy, sampling=hot, key=jax.random.key(0), **kwargs)
    b = decoding.generate(members, proxy, sampling=hot, key=jax.random.key(0), **kwargs)
    c = decoding.generate(members, proxy, sampling=hot, key=jax.random.key(1), **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    greedy = decoding.generate(members, proxy, **kwargs)
    top1 = decoding.sampling(temperature=1.0, top_k=1, top_p=1.0)  # same structure as `hot`
    d = decoding.generate(members, proxy, sampling=top1, key=jax.random.key(2), **kwargs)
    np.testing.assert_array_equal(d.tokens, greedy.tokens)


def test_under_jit_compiled_once_for_two_prompts(lms, prompts):
    traces = []

    def counted(logits):
        traces.append(1)
        return first(logits)

    model, _, variables = lms["strong"]

    @jax.jit
    def run(variables, prompt, lengths):
        members = [decoding.Member(model, variables, prompt, lengths)]
        return decoding.generate(members, counted, max_new_tokens=N)

    p1 = jnp.asarray(prompts["strong"], jnp.int32)
    p2 = jnp.asarray(prompts["other"], jnp.int32)
    lengths = jnp.array([5, 3], jnp.int32)
    out1 = run(variables, p1, lengths)
    n_traces = len(traces)
    out2 = run(variables, p2, lengths)
    assert len(traces) == n_traces  # no retrace for new prompt values
    assert isinstance(out2, decoding.GenerateOutput)
    ref = decoding.generate(
        [decoding.Member(model, variables, p1, lengths)], with_alpha, max_new_tokens=N, **NO_STOPS
    )
    np.testing.assert_array_equal(out1.tokens, ref.tokens)
    assert not np.array_equal(out1.tokens, out2.tokens)


class TestValidation:
    def members(self, lms, prompts):
        return [member(lms, n, prompts[n]) for n in ("strong", "expert", "base")]

    def test_mismatched_batch_sizes(self, lms, prompts):
        ms = self.members(lms, prompts)
        ms[1] = ms[1]._replace(prompt=ms[1].prompt[:1])
        with pytest.raises(ValueError, match=r"members\[1\]\.prompt has batch size 1"):
            decoding.generate(ms, proxy, max_new_tokens=N, fuse_args=(1.0,))

    def test_prompt_longer_than_the_model_or_cache(self, lms, prompts):
        ms = self.members(lms, prompts)
        with pytest.raises(ValueError, match=r"members\[0\].*max_length=32"):
            decoding.generate(ms, proxy, max_new_tokens=30, fuse_args=(1.0,))
        with pytest.raises(ValueError, match=r"cache_lengths\[0\]=8"):
            decoding.generate(ms, proxy, max_new_tokens=N, cache_lengths=[8, 20, 20])

    def test_bad_prompt_lengths_and_settings(self, lms, prompts):
        ms = self.members(lms, prompts)
        bad = [ms[0]._replace(prompt_lengths=jnp.array([0, 5]))]
        with pytest.raises(ValueError, match=r"members\[0\]\.prompt_lengths must be in 1\.\.5"):
            decoding.generate(bad, first, max_new_tokens=N)
        with pytest.raises(ValueError, match="max_new_tokens"):
            decoding.generate(ms[:1], first, max_new_tokens=0)
        with pytest.raises(ValueError, match="needs key"):
            decoding.generate(ms[:1], first, max_new_tokens=N, sampling=decoding.sampling())
        with pytest.raises(ValueError, match="top_p"):
            decoding.generate(
                ms[:1], first, max_new_tokens=N, sampling=decoding.SamplingConfig(1.0, None, 2.0)
            )
        with pytest.raises(TypeError, match=r"members\[0\]\.prompt must be \[B, P\] integer"):
            decoding.generate([ms[0]._replace(prompt=jnp.ones((2, 3)))], first, max_new_tokens=N)

    def test_vocab_mismatch_errors_unless_fuse_handles_it(self, lms, prompts):
        from fusionjax import zoo

        other = zoo.Decoder(vocab_size=VOCAB + 8, dim=16, depth=1, heads=2, max_length=32)
        variables = random_variables(other, 0)
        ms = [
            member(lms, "strong", prompts["strong"]),
            decoding.Member(decoding.from_linen(other), variables, prompts["expert"]),
        ]

        def naive(logits):
            return jax.nn.log_softmax(logits[0] + logits[1])

        with pytest.raises(ValueError, match=r"vocabulary sizes \[32, 40\]"):
            decoding.generate(ms, naive, max_new_tokens=N)

        def truncating(logits):
            return jax.nn.log_softmax(logits[0] + logits[1][:, :VOCAB])

        out = decoding.generate(ms, truncating, max_new_tokens=N)
        assert out.tokens.shape == (2, N)

    def test_fuse_returning_the_wrong_shape(self, lms, prompts):
        ms = self.members(lms, prompts)[:1]
        with pytest.raises(ValueError, match=r"fuse must return log-probabilities \[B, V\]"):
            decoding.generate(ms, lambda logits: logits[0][0], max_new_tokens=N)
        with pytest.raises(ValueError, match=r"aux\['a'\] has shape \(\)"):
            decoding.generate(
                ms, lambda logits: (first(logits), {"a": jnp.float32(0)}), max_new_tokens=N
            )

    def test_stacked_params_with_unequal_leading_axes(self, lms, prompts):
        ms = self.members(lms, prompts)
        bad = ms[1]._replace(params={"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}, stacked=True)
        with pytest.raises(ValueError, match=r"members\[1\]\.params is stacked=True, but leaf"):
            decoding.generate([ms[0], bad], first, max_new_tokens=N)
