"""The static random sampler: exact counts, and a uniform choice over many keys."""

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.ops import sampling


def _draw(pos, neg, num, frac, keys):
    f = jax.jit(jax.vmap(lambda k: sampling.random_sample(k, pos, neg, num=num, pos_fraction=frac)))
    return [np.asarray(a) for a in f(keys)]


def test_exact_counts_and_disjoint_slots():
    n = 50
    pos = jnp.zeros(n, bool).at[jnp.arange(0, 30)].set(True)  # 30 positives > 8 allowed
    neg = jnp.zeros(n, bool).at[jnp.arange(25, 50)].set(True)  # 25..29 are both: positive
    idx, is_pos, valid = _draw(pos, neg, 16, 0.5, jax.random.split(jax.random.PRNGKey(0), 20))
    for i, p, v in zip(idx, is_pos, valid, strict=True):
        assert p.sum() == 8 and (v & ~p).sum() == 8 and v.all()
        assert np.all(i[p] < 30) and np.all(i[v & ~p] >= 30)
        assert len(set(i[v].tolist())) == 16  # no candidate twice


def test_few_candidates_leave_invalid_slots():
    pos = jnp.zeros(20, bool).at[3].set(True)
    neg = jnp.zeros(20, bool).at[jnp.asarray([5, 6, 7])].set(True)
    idx, is_pos, valid = _draw(pos, neg, 10, 0.25, jax.random.split(jax.random.PRNGKey(1), 3))
    for i, p, v in zip(idx, is_pos, valid, strict=True):
        # one positive (up to 2 allowed), then all 3 negatives, then 6 empty slots
        np.testing.assert_array_equal(p, [True] + [False] * 9)
        np.testing.assert_array_equal(v, [True] * 4 + [False] * 6)
        assert i[0] == 3 and sorted(i[1:4].tolist()) == [5, 6, 7]


def test_choice_is_uniform_over_keys():
    # 12 positives, 4 kept per draw: each is kept with probability 1/3. 20 negatives, 4 kept: 1/5.
    n = 32
    pos = jnp.arange(n) < 12
    neg = ~pos
    trials = 6000
    idx, is_pos, valid = _draw(pos, neg, 8, 0.5, jax.random.split(jax.random.PRNGKey(2), trials))
    counts = np.zeros(n)
    np.add.at(counts, idx[valid], 1)
    for cand, p in ((slice(0, 12), 1 / 3), (slice(12, 32), 1 / 5)):
        freq = counts[cand] / trials
        sd = np.sqrt(p * (1 - p) / trials)
        assert np.all(np.abs(freq - p) < 5 * sd), freq
    # Pairs are uniform too (not just marginals): P(0 and 1 both kept) = C(10,2)/C(12,4) = 1/11.
    both = np.mean([(0 in row[:4]) and (1 in row[:4]) for row in idx])
    assert abs(both - 1 / 11) < 5 * np.sqrt((1 / 11) * (10 / 11) / trials)
