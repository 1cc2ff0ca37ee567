"""mmdetection's `RandomSampler` with static shapes: exact counts, uniform choice.

`RandomSampler(num, pos_fraction)` keeps min(#pos, int(num * pos_fraction)) random positives
and fills the rest with min(#neg, num - kept positives) random negatives (`neg_pos_ub=-1`).
Here each candidate draws a uniform key and `top_k` keeps the largest keys among positives and
among negatives: every subset of a given size is equally likely, as with `torch.randperm`, and
the output always has `num` slots (positives first, then negatives, then invalid padding).
"""

import jax
import jax.numpy as jnp


def random_sample(key, pos, neg, *, num, pos_fraction):
    """Samples `num` slots from the candidates of one image.

    Args:
      key: PRNG key.
      pos: [N] bool, positive candidates.
      neg: [N] bool, negative candidates (a candidate that is both counts as positive).
      num: the number of slots (256 for the RPN, 512 for the RoI head).
      pos_fraction: the largest share of positives (0.5 RPN, 0.25 RoI head).
    Returns:
      idx: [num] int32 candidate index of each slot (0 where invalid).
      is_pos: [num] bool, the slot holds a positive.
      valid: [num] bool, the slot holds a sampled candidate (positive or negative).
    """
    n = pos.shape[0]
    max_pos = int(num * pos_fraction)
    kp, kn = jax.random.split(key)
    neg = neg & ~pos
    pos_keys = jnp.where(pos, jax.random.uniform(kp, (n,)), -1.0)
    neg_keys = jnp.where(neg, jax.random.uniform(kn, (n,)), -1.0)
    k_pos = min(max_pos, n)
    k_neg = min(num, n)
    if k_pos < 1:
        raise ValueError(f"num * pos_fraction = {num * pos_fraction} keeps no positives")
    _, pos_idx = jax.lax.top_k(pos_keys, k_pos)
    _, neg_idx = jax.lax.top_k(neg_keys, k_neg)
    num_pos = jnp.minimum(pos.sum(), k_pos)
    num_neg = jnp.minimum(neg.sum(), num - num_pos)
    slot = jnp.arange(num)
    is_pos = slot < num_pos
    from_pos = pos_idx[jnp.clip(slot, 0, pos_idx.shape[0] - 1)]
    from_neg = neg_idx[jnp.clip(slot - num_pos, 0, k_neg - 1)]
    valid = is_pos | ((slot >= num_pos) & (slot - num_pos < num_neg))
    idx = jnp.where(is_pos, from_pos, jnp.where(valid, from_neg, 0))
    return idx.astype(jnp.int32), is_pos, valid
