"""The decoder's MLP tiled over the sequence, so that long-context training never holds a
[tokens, intermediate] activation for the whole sequence (Llama-3-8B at 300k tokens: 8.6 GB in
bfloat16 per tensor, and the MLP's backward holds several).

Each row of the batch is cut along the sequence into tiles of equal length; a lax.scan runs the MLP
on one tile of every row at a time, inside a custom_vjp whose forward keeps only its inputs (the
normed hidden states, [.., hidden], and the weights). Its backward scans the tiles again, recomputing
one tile's MLP and taking its gradient before the next, so at most one tile's intermediate
activations are alive in either direction, and sums the weights' gradients over the tiles (LoRA A
and B, and the base kernels if they are differentiated). Tiling along the sequence rather than the
flattened batch keeps the batch axis whole, so a batch sharded over devices stays local.

What it costs, in the MLP's matmuls: under use_gradient_checkpointing True or "unsloth" nothing
(the layer's recompute no longer runs the MLP, whose output its backward does not need, and the
tile's backward runs it instead); without checkpointing one more forward; under "selective" the
gate_proj/up_proj forwards, whose outputs that mode would otherwise keep. So tiling is off by
default and "auto" turns it on only where the activation is large.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jaxtyping import Array, Float

from fastft_jax import ops

# mlp_tile_tokens="auto": a batch is tiled once one [tokens, intermediate] activation in the compute
# dtype would pass AUTO_START_BYTES (Llama-3-8B in bfloat16: 37,449 tokens), into tiles whose
# activation stays under AUTO_TILE_BYTES (9,362 tokens there). Tiles of that size still run the
# matmuls at full speed (thousands of rows), and below the start the MLP's few GiB of activations
# are cheaper to hold than to recompute.
AUTO_START_BYTES = 1 << 30
AUTO_TILE_BYTES = 256 << 20
# Under use_gradient_checkpointing="unsloth" (the user asked for the least memory) tiling costs no
# extra matmul (the layer's recompute skips the MLP; the tiles' backward runs it), so "auto" tiles as
# soon as one activation passes OFFLOAD_TILE_BYTES, in tiles of at most that: 56 MiB is 2048 tokens of
# Llama-3-8B's 14336-wide MLP in bf16, measured on an H100 at batch 2 x 2048 as 10,686 tok/s and
# 16.65 GiB against 10,447 tok/s and 16.78 GiB untiled (bench/RESULTS.md).
OFFLOAD_TILE_BYTES = 56 << 20


def mlp_tile_for(
    tokens: int, intermediate_size: int, dtype: Any, ops_config: ops.OpsConfig,
    gradient_checkpointing: bool | str = False,
) -> int:
    """The most tokens per MLP tile for a batch of `tokens` (batch * seq), or 0 for no tiling."""
    setting = ops_config.mlp_tile_tokens
    if setting == "auto":
        bytes_per_token = intermediate_size * jnp.dtype(dtype).itemsize
        start, tile = (
            (OFFLOAD_TILE_BYTES, OFFLOAD_TILE_BYTES) if gradient_checkpointing == "unsloth"
            else (AUTO_START_BYTES, AUTO_TILE_BYTES)
        )
        if tokens * bytes_per_token <= start:
            return 0
        return max(1, tile // bytes_per_token)
    return 0 if setting >= tokens else setting


def tile_plan(seq: int, batch: int, tile_tokens: int) -> tuple[int, int]:
    """(tiles, positions per tile): tiles of at most tile_tokens tokens (batch * positions; at least
    one position), of equal length, so that the padding at the end is shorter than the tile count."""
    max_positions = max(1, tile_tokens // batch)
    num_tiles = -(-seq // max_positions)
    return num_tiles, -(-seq // num_tiles)


def tiled_mlp(
    mlp_fn: Callable[[Any, Array, Array | None], Array],
    weights: Any,
    normed: Float[Array, "batch seq hidden"],
    tile_tokens: int,
    dropout_rng: Array | None = None,
) -> Float[Array, "batch seq hidden_out"]:
    """mlp_fn(weights, normed, dropout_rng), evaluated over sequence tiles of at most tile_tokens tokens.

    mlp_fn maps [batch, positions, hidden] to [batch, positions, hidden_out] position by position
    (each output token depends on its own input token only); weights is the pytree of everything it
    differentiates (it must close over no traced array). tile_tokens 0, or at least batch * seq,
    calls it once on the whole input, exactly as without tiling.

    The sequence is padded at the end to a whole number of tiles; padded positions run through the
    MLP and are dropped, so their gradient, and their share of every weight's gradient, is zero.

    Dropout: tile i draws its masks from fold_in(dropout_rng, i). A token's mask is thus fixed by
    the rng, the tile plan and its position, and the backward's recompute draws the same one; it is
    a different draw from the untiled model's (same distribution), and tile masks are independent.
    """
    batch, seq, hidden = normed.shape
    if tile_tokens <= 0 or tile_tokens >= batch * seq:
        return mlp_fn(weights, normed, dropout_rng)
    num_tiles, positions = tile_plan(seq, batch, tile_tokens)
    pad = num_tiles * positions - seq
    if pad:
        normed = jnp.pad(normed, ((0, 0), (0, pad), (0, 0)))
    # [tiles, batch, positions, hidden]: with batch 1 (long context) this is a free reshape.
    tiles = normed.reshape(batch, num_tiles, positions, hidden).swapaxes(0, 1)
    out_tiles = _tiled(mlp_fn, weights, tiles, dropout_rng)
    out = out_tiles.swapaxes(0, 1).reshape(batch, num_tiles * positions, out_tiles.shape[-1])
    return out[:, :seq] if pad else out


# The tiles run inside a custom_vjp rather than under jax.checkpoint: a checkpoint nested in the
# layer's checkpoint takes the layer's policy, so the "selective" mode would keep the tiles'
# gate_proj/up_proj outputs (named MATMUL_OUTPUT) for every tile, i.e. [tokens, intermediate] again.
# Here the forward keeps the inputs alone, whatever the enclosing policy.
#
# Backward, per tile t with input x_t, output cotangent g_t and the weights W:
#   (dW_t, dx_t) = vjp of mlp_fn at (W, x_t) applied to g_t, recomputing the tile's forward;
#   dW = sum_t dW_t (accumulated in float32 in the scan carry), dx = [dx_1; ...; dx_T].
# Only the weights that are differentiated (perturbed) get a gradient: frozen base kernels cost no
# x^T g matmul and integer leaves (quantized codes) none at all.
def _tile_rng(dropout_rng: Array | None, index: Array) -> Array | None:
    return None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(mlp_fn, weights, tiles, dropout_rng):
    def step(carry, tile_and_index):
        tile, index = tile_and_index
        return carry, mlp_fn(weights, tile, _tile_rng(dropout_rng, index))

    return jax.lax.scan(step, None, (tiles, jnp.arange(tiles.shape[0], dtype=jnp.int32)))[1]


def _tiled_fwd(mlp_fn, weights, tiles, dropout_rng):
    weight_leaves, weight_tree = jax.tree.flatten(weights, is_leaf=lambda node: isinstance(node, CustomVJPPrimal))
    # None-or-array markers carry the static "which gradients" choice through the residuals.
    wanted = [jnp.zeros(()) if leaf.perturbed else None for leaf in weight_leaves]
    weights = jax.tree.unflatten(weight_tree, [leaf.value for leaf in weight_leaves])
    want_tiles = jnp.zeros(()) if tiles.perturbed else None
    rng = dropout_rng.value if isinstance(dropout_rng, CustomVJPPrimal) else None
    out = _tiled(mlp_fn, weights, tiles.value, rng)
    return out, (wanted, want_tiles, weights, tiles.value, rng)


def _tiled_bwd(mlp_fn, saved, out_cotangent):
    wanted, want_tiles, weights, tiles, dropout_rng = saved
    want_tiles = want_tiles is not None
    leaves, weight_tree = jax.tree.flatten(weights)
    wanted_index = [i for i, marker in enumerate(wanted) if marker is not None]
    if isinstance(out_cotangent, SymbolicZero) or not (wanted_index or want_tiles):
        return None, None, None

    def tile_fn(wanted_leaves, tile, index):
        all_leaves = list(leaves)
        for i, leaf in zip(wanted_index, wanted_leaves):
            all_leaves[i] = leaf
        return mlp_fn(jax.tree.unflatten(weight_tree, all_leaves), tile, _tile_rng(dropout_rng, index))

    def step(weight_grads, per_tile):
        tile, cotangent, index = per_tile
        _, vjp = jax.vjp(lambda wanted_leaves, tile: tile_fn(wanted_leaves, tile, index), [leaves[i] for i in wanted_index], tile)
        d_leaves, d_tile = vjp(cotangent)
        weight_grads = [acc + d.astype(jnp.float32) for acc, d in zip(weight_grads, d_leaves)]
        return weight_grads, d_tile if want_tiles else None

    zeros = [jnp.zeros(leaves[i].shape, jnp.float32) for i in wanted_index]
    indices = jnp.arange(tiles.shape[0], dtype=jnp.int32)
    weight_grads, d_tiles = jax.lax.scan(step, zeros, (tiles, out_cotangent, indices))
    grad_leaves = [None] * len(leaves)
    for i, grad in zip(wanted_index, weight_grads):
        grad_leaves[i] = grad.astype(leaves[i].dtype)
    return jax.tree.unflatten(weight_tree, grad_leaves), d_tiles, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd, symbolic_zeros=True)
