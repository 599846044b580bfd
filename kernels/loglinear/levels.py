"""The Fenwick level structure of log-linear attention (positions are 0-indexed and global).

For a query at position t and a source s <= t: level(t, s) = 0 if s == t, else bit_length(t XOR s).
The sources of level l >= 1 form one bucket of 2^(l-1) consecutive positions, present exactly when bit
l-1 of t is set. Equivalently, level(t, s) <= l  <=>  s and t lie in the same aligned block of 2^l
positions (s >> l == t >> l). That identity is what every fast form here rests on.

Going from query t-1 to query t (t >= 1) the buckets merge like a Fenwick tree: with
m = bit_length(t XOR (t-1)) (= trailing zeros of t, plus one), the buckets of levels 0..m of query t-1
become the one bucket of level m of query t; the buckets above m stay as they are.
"""
from __future__ import annotations

import torch


def level(t: int, s: int) -> int:
    """level(t, s) for 0 <= s <= t."""
    if not 0 <= s <= t:
        raise ValueError(f"level(t, s) needs 0 <= s <= t, got t={t}, s={s}")
    return 0 if s == t else (t ^ s).bit_length()


def levels_needed(total_len: int) -> int:
    """Entries of level_weights a sequence of total_len tokens (positions 0..total_len-1) needs:
    the highest level any query reaches is bit_length(total_len - 1)."""
    return max(int(total_len) - 1, 0).bit_length() + 1


def merge_level(t: int) -> int:
    """The level whose bucket absorbs the buckets 0..m of query t-1 when query t begins (t >= 1)."""
    return (t ^ (t - 1)).bit_length()


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Elementwise bit_length of non-negative int64 values (exact below 2^53)."""
    _, exponent = torch.frexp(x.to(torch.float64))
    return torch.where(x > 0, exponent.to(torch.int64), torch.zeros_like(x))


def level_matrix(t_pos: torch.Tensor, s_pos: torch.Tensor) -> torch.Tensor:
    """level(t, s) for every pair of query positions t_pos [T] and source positions s_pos [S], int64
    [T, S]; pairs with s > t get -1."""
    t = t_pos[:, None].to(torch.int64)
    s = s_pos[None, :].to(torch.int64)
    lv = bit_length(t ^ s)
    return torch.where(s <= t, lv, torch.full_like(lv, -1))
