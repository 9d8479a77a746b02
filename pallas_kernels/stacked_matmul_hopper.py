"""x @ w_stack[layer] (or x @ w_stack[layer].T) for Hopper (sm90), through Pallas' Mosaic GPU
backend, reading the layer's weight straight out of the stacked [layers, d_in, d_out] array.

Why: a jax.lax.scan over decoder layers slices each layer's frozen weight out of the stack with a
traced index, and XLA copies that dynamic slice into a fresh buffer before cuBLAS reads it. This
kernel takes the whole stack plus the layer index (as data, a 1-element int32 operand) and points
its TMA copies at w_stack[layer] directly, so nothing is copied and the scan stays.

Structure (jax's hopper_matmul_mgpu example, written for this case): a persistent grid of one CTA
per SM walks the output tiles; per CTA a producer warpgroup streams K-steps of the x tile and the
weight tile through a ring of swizzled smem slots with TMA, two consumer warpgroups each wgmma one
half of the output tile into f32 registers, and the epilogue writes it back through smem with TMA.
transpose_w=True reads the same [d_in, d_out] weight tiles and hands wgmma a transposed smem view.

An optional addend ([tokens, d_y], x.dtype) is added to the float32 accumulator in the epilogue, so
x @ W + addend is rounded to 16 bits once: a LoRA layer passes its adapter's term here, which
rounding x @ W first and adding it after would drop while it is below half a bf16 ulp of x @ W.

An optional low-rank term low = (low_lhs [tokens, r], low_rhs [r, d_y]) is multiplied into the same
float32 accumulator after the K loop (a few extra wgmma K-steps whose operands TMA brings into the
epilogue's own smem while the K loop runs), so x @ W + low_lhs @ low_rhs is rounded once without a
[tokens, d_y] addend ever being written to or read from memory: a LoRA layer passes (x a, s b).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels._common import cdiv, is_sm90_gpu

_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_COMPUTE_WGS = 2  # consumer warpgroups per CTA; a third one (the producer) issues the TMA copies
_SMEM_BYTES = 227 * 1024  # the most dynamic shared memory one sm90 CTA may use
_SM90_SMS = 132  # H100 / H200 SXM; used when tracing without a GPU (an export from a CPU)
_SWIZZLE_BYTES = 128
_MBARRIER_BYTES = 8
_SWIZZLE_ELEMS = _SWIZZLE_BYTES // 2  # 16-bit elements in one 128-byte swizzle row
_TRANSFORMS = (plgpu.TilingTransform((8, _SWIZZLE_ELEMS)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))


def _low_transforms(rank_chunk: int, itemsize: int):
    """A [rows, rank_chunk] smem tile swizzled by its whole row (rank_chunk 16-bit elements)."""
    return plgpu.TilingTransform((8, rank_chunk)), plgpu.SwizzleTransform(rank_chunk * itemsize)


def available() -> bool:
    """True when the default backend is an sm90 GPU (H100/H200/GH200); never raises."""
    return is_sm90_gpu()


@dataclasses.dataclass(frozen=True)
class HopperMatmulTiles:
    """One CTA computes a tile_m x (2 * tile_n) output tile: both consumer warpgroups share the x
    tile and each owns tile_n columns. tile_k is the K-step of the pipeline, stages the number of
    smem slots in flight, epilogue_n the width of one TMA store of the output."""

    tile_m: int
    tile_n: int
    tile_k: int
    stages: int
    epilogue_m: int
    epilogue_n: int
    grid_tile_width: int

    @property
    def cta_tile_n(self) -> int:
        return _COMPUTE_WGS * self.tile_n

    def smem_bytes(self, itemsize: int, addend: bool = False, low: bool = False) -> int:
        """Shared memory of one CTA. An addend's pieces are loaded into the output's own epilogue
        slots (the sum is written back over them), so an addend adds only one mbarrier per slot,
        which its TMA loads complete on. A low-rank term's operand tiles alias the epilogue slots
        too (a RefUnion of the same size, see low_rank_chunk), so it adds one mbarrier per
        consumer warpgroup."""
        ring = self.stages * (self.tile_m * self.tile_k + self.tile_k * self.cta_tile_n) * itemsize
        epilogue = _COMPUTE_WGS * self.out_slots * self.epilogue_m * self.epilogue_n * itemsize
        addend_barriers = _COMPUTE_WGS * self.out_slots * _MBARRIER_BYTES if addend else 0
        low_barriers = _COMPUTE_WGS * _MBARRIER_BYTES if low else 0
        return ring + epilogue + addend_barriers + low_barriers

    @property
    def low_rank_chunk(self) -> int:
        """Rank columns per low-rank K-step. One consumer warpgroup's epilogue slots hold its two
        operand tiles, low_lhs [tile_m, chunk] and low_rhs^T [tile_m, chunk] (its tile_n <= tile_m
        output columns, or the CTA's when tile_n < tile_m), and hold exactly that: each warpgroup's
        operands then sit in its own slots (a RefUnion's groups start at the same byte), never in
        the other warpgroup's, whose last stores may still be reading them. 32 at 64 x 64 slots
        and tile_m 128."""
        per_wg = self.out_slots * self.epilogue_m * self.epilogue_n
        return per_wg // (2 * self.tile_m) if per_wg % (2 * self.tile_m) == 0 else 0

    def low_rank_padded(self, rank: int) -> int:
        """The rank rounded up to whole chunks (the wrapper pads both operands with zeros)."""
        return cdiv(rank, self.low_rank_chunk) * self.low_rank_chunk

    @property
    def out_slots(self) -> int:
        return min(2, (self.tile_m * self.tile_n) // (self.epilogue_m * self.epilogue_n))


def choose_tiles(tokens: int, d_k: int, d_n: int) -> HopperMatmulTiles:
    """Tiles for an [tokens, d_k] @ [d_k, d_n] product (d_k, d_n: the weight's contracted and
    output dimensions in this orientation).

    tile_k = 64: 64 16-bit elements are one 128-byte swizzle row, the widest swizzle, so every smem
    tile (x [tile_m, 64]; weight [64, n] forward, [n, 64] transposed) is read by wgmma without
    bank conflicts, and a K-step is 4 wgmma instructions deep.
    tile_m = 128, tile_n = 128 per consumer warpgroup: a 128 x 128 f32 accumulator is 128
    registers of the 232 a consumer thread gets, and the 128 x 256 CTA tile halves the smem
    traffic per flop against 128 x 128 (the shape CUTLASS's and jax's own sm90 GEMMs settle on).
    d_n that is a multiple of 128 but not 256 takes tile_n = 64 instead (no real Llama/Qwen size
    needs it: 256, 512, 1024, 1536, 3584, 4096, 8960, 14336 and 18944 are all multiples of 256).
    stages = 4: 4 x (16 KiB x tile + 32 KiB weight tile) + 32 KiB of epilogue buffers = 224 KiB
    of the 227 KiB; a 5th slot would not fit, and 4 slots of 64-deep K cover the TMA latency.
    Epilogue 64 x 64: each consumer stores its tile in 64 x 64 pieces through two smem slots, so
    the TMA store of one piece overlaps writing the next into smem. An addend is loaded into those
    same slots (see HopperMatmulTiles.smem_bytes), so the same tiles serve a product with one.
    grid_tile_width = 8: the persistent loop walks the output tiles in bands 8 CTA-columns wide,
    so the 132 CTAs in flight read about 16 x-row tiles and 8 weight-column tiles at a time,
    which stay in L2.
    """
    del tokens, d_k  # the same tiles serve every token count; the wrapper pads tokens to tile_m
    tile_n = 128 if d_n % (2 * 128) == 0 else 64
    return HopperMatmulTiles(
        tile_m=128, tile_n=tile_n, tile_k=64, stages=4, epilogue_m=64, epilogue_n=64, grid_tile_width=8
    )


def _check(x, w_stack, layer, transpose_w: bool, addend=None, low=None) -> None:
    """Raise a ValueError (saying what to use instead) for what this kernel does not handle."""
    fallback = "use pallas_kernels.stacked_matmul_hopper.stacked_matmul_reference (XLA) instead"
    if x.ndim != 2 or w_stack.ndim != 3:
        raise ValueError(
            f"stacked_matmul_hopper takes x [tokens, d] and w_stack [layers, d_in, d_out], got x {x.shape} "
            f"and w_stack {w_stack.shape}; flatten leading token axes first"
        )
    if jnp.dtype(x.dtype) not in _SUPPORTED_DTYPES or jnp.dtype(w_stack.dtype) != jnp.dtype(x.dtype):
        raise ValueError(
            f"stacked_matmul_hopper needs x and w_stack both bfloat16 or both float16, got x {x.dtype} and "
            f"w_stack {w_stack.dtype}; {fallback} (or cast the inputs)"
        )
    if jnp.shape(layer) not in ((), (1,)) or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise ValueError(f"layer must be an integer scalar (a traced one is fine), got {jnp.shape(layer)} "
                         f"{jnp.result_type(layer)}")
    _, d_in, d_out = w_stack.shape
    d_k, d_n = (d_out, d_in) if transpose_w else (d_in, d_out)
    if x.shape[1] != d_k:
        raise ValueError(
            f"x has {x.shape[1]} features but w_stack {w_stack.shape} with transpose_w={transpose_w} "
            f"contracts over {d_k}"
        )
    # The weight is never padded (that would copy the stack, the very thing this kernel avoids),
    # so its tiles must divide it.
    if d_k % 64 or d_n % 128:
        raise ValueError(
            f"stacked_matmul_hopper needs the contracted weight dimension to be a multiple of 64 and the "
            f"output one a multiple of 128, got {d_k} and {d_n} (w_stack {w_stack.shape}, "
            f"transpose_w={transpose_w}); {fallback}"
        )
    if addend is not None:
        if tuple(jnp.shape(addend)) != (x.shape[0], d_n):
            raise ValueError(
                f"addend must have the output's shape [tokens, d_y] = {(x.shape[0], d_n)} (x {x.shape}, "
                f"w_stack {w_stack.shape}, transpose_w={transpose_w}), got {tuple(jnp.shape(addend))}"
            )
        if jnp.result_type(addend) != jnp.dtype(x.dtype):
            raise ValueError(
                f"addend must have x's dtype {jnp.dtype(x.dtype)} (the kernel adds it in float32 and rounds "
                f"the sum once to that dtype), got {jnp.result_type(addend)}; cast it with addend.astype(x.dtype)"
            )
    if low is not None:
        if addend is not None:
            raise ValueError(
                "stacked_matmul_hopper takes either addend or low, not both; fold the addend into the "
                "low-rank term, or add low_lhs @ low_rhs to the addend yourself"
            )
        if not isinstance(low, (tuple, list)) or len(low) != 2:
            raise ValueError(f"low must be a pair (low_lhs [tokens, r], low_rhs [r, d_y]), got {low!r:.200}")
        low_lhs, low_rhs = low
        rank = jnp.shape(low_lhs)[1] if jnp.ndim(low_lhs) == 2 else None
        if jnp.ndim(low_lhs) != 2 or jnp.shape(low_lhs)[0] != x.shape[0] or rank < 1:
            raise ValueError(
                f"low_lhs must be [tokens, r] = [{x.shape[0]}, r] with r >= 1 (x {x.shape}), got "
                f"{tuple(jnp.shape(low_lhs))}"
            )
        if tuple(jnp.shape(low_rhs)) != (rank, d_n):
            raise ValueError(
                f"low_rhs must be [r, d_y] = {(rank, d_n)} (low_lhs {tuple(jnp.shape(low_lhs))}, w_stack "
                f"{w_stack.shape}, transpose_w={transpose_w}), got {tuple(jnp.shape(low_rhs))}"
            )
        for name, operand in (("low_lhs", low_lhs), ("low_rhs", low_rhs)):
            if jnp.result_type(operand) != jnp.dtype(x.dtype):
                raise ValueError(
                    f"{name} must have x's dtype {jnp.dtype(x.dtype)} (wgmma multiplies 16-bit operands into "
                    f"the float32 accumulator), got {jnp.result_type(operand)}; cast it with "
                    f"{name}.astype(x.dtype)"
                )


def _num_sms() -> int:
    if jax.default_backend() == "gpu":
        return jax.devices()[0].core_count
    return _SM90_SMS


def _kernel_body(layer_ref, x_gmem, w_gmem, *extra_and_out_gmem, tiles: HopperMatmulTiles, transpose_w: bool,
                 extra: str | None):
    """The refs are (layer, x, w_stack, out); with extra="addend" (layer, x, w_stack, addend, out);
    with extra="low" (layer, x, w_stack, low_lhs [tokens, r], low_rhs^T [d_y, r], out), r padded
    to whole rank chunks."""
    *extra_gmem, out_gmem = extra_and_out_gmem
    addend_gmem = extra_gmem[0] if extra == "addend" else None
    low_lhs_gmem, low_rhs_t_gmem = extra_gmem if extra == "low" else (None, None)
    tokens, d_k = x_gmem.shape
    d_n = out_gmem.shape[1]
    tile_m, tile_n, tile_k = tiles.tile_m, tiles.tile_n, tiles.tile_k
    cta_tile_n = tiles.cta_tile_n
    m_tiles, n_tiles, k_steps = tokens // tile_m, d_n // cta_tile_n, d_k // tile_k
    epilogue_m, epilogue_n = tiles.epilogue_m, tiles.epilogue_n
    out_slots = tiles.out_slots
    dtype = out_gmem.dtype

    # The layer index is data: one int32 in gmem, read as a scalar. The TMA source view below
    # indexes the stack's leading axis with it, so every copy reads w_stack[layer] in place.
    layer = layer_ref[0]
    w_layer = w_gmem.at[layer]

    if transpose_w:  # weight tiles are [n, k] rows of w_stack[layer]; wgmma reads them transposed
        w_spec = plgpu.BlockSpec((cta_tile_n, tile_k), lambda k: (0, k), transforms=_TRANSFORMS)
    else:
        w_spec = plgpu.BlockSpec((tile_k, cta_tile_n), lambda k: (k, 0), transforms=_TRANSFORMS)
    x_spec = plgpu.BlockSpec((tile_m, tile_k), lambda k: (0, k), transforms=_TRANSFORMS)

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[x_spec, w_spec],
            wg_axis="wg",
            num_compute_wgs=_COMPUTE_WGS,
            max_concurrent_steps=tiles.stages,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None  # the body does not change the allocations

    out_alloc = plgpu.SMEM((_COMPUTE_WGS, out_slots, epilogue_m, epilogue_n), dtype, transforms=_TRANSFORMS)
    rank_chunk = tiles.low_rank_chunk
    if low_lhs_gmem is None:
        epilogue_alloc, low_loaded_alloc, low_chunks = out_alloc, None, 0
    else:
        # [wg, 0] is the warpgroup's low_lhs tile, [wg, 1] its low_rhs^T tile, both aliased onto
        # the warpgroup's own epilogue slots (see HopperMatmulTiles.low_rank_chunk).
        low_alloc = plgpu.SMEM((_COMPUTE_WGS, 2, tile_m, rank_chunk), dtype,
                               transforms=_low_transforms(rank_chunk, dtype.itemsize))
        epilogue_alloc = plgpu.RefUnion(out_alloc, low_alloc)
        low_loaded_alloc = plgpu.Barrier(num_arrivals=2, num_barriers=_COMPUTE_WGS)  # the lhs and rhs copies
        low_chunks = low_lhs_gmem.shape[1] // rank_chunk

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_layer),
        epilogue_smem=epilogue_alloc,
        addend_loaded=None if addend_gmem is None else plgpu.Barrier(num_barriers=_COMPUTE_WGS * out_slots),
        low_loaded=low_loaded_alloc,
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, epilogue_smem, addend_loaded, low_loaded):
        if low_lhs_gmem is None:
            out_smem, low_smem = epilogue_smem, None
        else:
            out_smem, low_smem = epilogue_smem
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile_loop(loop_info):
            (linear,) = loop_info.index
            m_idx, n_idx = plgpu.planar_snake(linear, (m_tiles, n_tiles), 1, tiles.grid_tile_width)
            rows = pl.ds(m_idx * tile_m, tile_m)
            cta_cols = pl.ds(n_idx * cta_tile_n, cta_tile_n)
            wg_cols = pl.ds(wg * tile_n, tile_n)

            pieces_n = tile_n // epilogue_n
            pieces = [
                (slice(piece_m * epilogue_m, (piece_m + 1) * epilogue_m),
                 slice(piece_n * epilogue_n, (piece_n + 1) * epilogue_n))
                for piece_m in range(tile_m // epilogue_m)
                for piece_n in range(pieces_n)
            ]

            def piece_of(gmem, piece):
                piece_rows, piece_cols = pieces[piece]
                return gmem.at[rows, cta_cols].at[:, wg_cols].at[piece_rows, piece_cols]

            def load_addend(piece):
                slot = piece % out_slots
                plgpu.copy_gmem_to_smem(
                    piece_of(addend_gmem, piece), out_smem.at[wg, slot], addend_loaded.at[wg * out_slots + slot]
                )

            # This warpgroup's tile_n output columns are rows of low_rhs^T. The smem tile has tile_m
            # rows: all of them when tile_n == tile_m, else (tile_n < tile_m == cta_tile_n) the
            # whole CTA's, of which the warpgroup multiplies its own tile_n.
            own_rhs_rows = tiles.tile_n == tile_m

            def load_low(chunk):
                ranks = pl.ds(chunk * rank_chunk, rank_chunk)
                rhs_rows = low_rhs_t_gmem.at[cta_cols].at[wg_cols if own_rhs_rows else slice(None)]
                plgpu.copy_gmem_to_smem(low_lhs_gmem.at[rows, ranks], low_smem.at[wg, 0], low_loaded.at[wg])
                plgpu.copy_gmem_to_smem(rhs_rows.at[:, ranks], low_smem.at[wg, 1], low_loaded.at[wg])

            def add_low_rank(acc_ref):
                """acc += low_lhs @ low_rhs, one rank chunk at a time: the first chunk's tiles were
                loaded during the K loop (see mma); a later one is loaded once the previous wgmma
                has read the slots (a TMA round trip per chunk past the first)."""
                for chunk in range(low_chunks):
                    plgpu.barrier_wait(low_loaded.at[wg])
                    rhs_t = low_smem.at[wg, 1] if own_rhs_rows else low_smem.at[wg, 1].at[wg_cols]
                    plgpu.wgmma(acc_ref, low_smem.at[wg, 0], rhs_t.transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    if chunk + 1 < low_chunks:
                        load_low(chunk + 1)

            def compute_context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                def _acc_scope(acc_ref):
                    if addend_gmem is not None:
                        # The first pieces' addend loads fly while the K-loop runs, into slots the
                        # previous tile's stores have finished reading.
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for piece in range(min(out_slots, len(pieces))):
                            load_addend(piece)
                    run_pipeline(acc_ref)
                    if low_lhs_gmem is not None:
                        add_low_rank(acc_ref)
                    if addend_gmem is None:
                        acc = acc_ref[...].astype(dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores
                    else:
                        acc = acc_ref[...]  # float32 until the addend is in: one rounding
                    for piece, (piece_rows, piece_cols) in enumerate(pieces):
                        slot = piece % out_slots
                        if addend_gmem is None:
                            plgpu.wait_smem_to_gmem(out_slots - 1, wait_read_only=True)
                            out_smem[wg, slot] = acc[piece_rows, piece_cols]
                        else:
                            if piece >= out_slots:  # the slot's previous store has read it
                                plgpu.wait_smem_to_gmem(out_slots - 1, wait_read_only=True)
                                load_addend(piece)
                            plgpu.barrier_wait(addend_loaded.at[wg * out_slots + slot])
                            addend_piece = out_smem[wg, slot].astype(jnp.float32)
                            out_smem[wg, slot] = (acc[piece_rows, piece_cols] + addend_piece).astype(dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], piece_of(out_gmem, piece))

            def mma(indices, x_smem, w_smem, acc_ref):
                if transpose_w:
                    w_tile = w_smem.at[wg_cols].transpose((1, 0))
                else:
                    w_tile = w_smem.at[:, wg_cols]
                plgpu.wgmma(acc_ref, x_smem, w_tile)
                if low_lhs_gmem is not None:
                    # The first rank chunk's tiles fly during the K loop, into slots the previous
                    # tile's stores have finished reading: waited for here, behind the first
                    # K-step's wgmma, rather than before it as the addend's loads are.
                    @pl.when(indices[0] == 0)
                    def _load_first_chunk():
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        load_low(0)

                plgpu.wgmma_wait(0)
                return acc_ref

            w_source = w_layer.at[cta_cols, :] if transpose_w else w_layer.at[:, cta_cols]
            pipeline(mma, compute_context)(x_gmem.at[rows, :], w_source, allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _check_low_rank_fits(tiles: HopperMatmulTiles, itemsize: int) -> None:
    """The kernel's low-rank layout assumes these tiles; another tile choice must fail here, at
    trace time, rather than alias another warpgroup's slots."""
    rank_chunk = tiles.low_rank_chunk
    fits = rank_chunk * itemsize in (32, 64, 128) and (
        tiles.tile_n == tiles.tile_m or tiles.cta_tile_n == tiles.tile_m)
    if not fits:
        raise ValueError(f"{tiles} cannot hold a low-rank term's tiles in its epilogue slots (rank chunk "
                         f"{rank_chunk}); pass the term as an addend instead")


def _stacked_matmul_kernel(x, w_stack, layer, addend, transpose_w: bool, low=None):
    tokens, d_k = x.shape
    _, d_in, d_out = w_stack.shape
    d_n = d_in if transpose_w else d_out
    tiles = choose_tiles(tokens, d_k, d_n)
    smem_bytes = tiles.smem_bytes(x.dtype.itemsize, addend=addend is not None, low=low is not None)
    if smem_bytes > _SMEM_BYTES:
        raise ValueError(f"{tiles} needs {smem_bytes} bytes of smem, over {_SMEM_BYTES}")
    # Token rows are padded up to tile_m here (a copy of x, and of the addend or low_lhs, only when
    # tokens is not a multiple of 128) and the padded rows of the output are sliced off; the weight
    # side is never padded.
    tokens_padded = cdiv(tokens, tiles.tile_m) * tiles.tile_m
    if tokens_padded != tokens:
        x = jnp.pad(x, ((0, tokens_padded - tokens), (0, 0)))
        if addend is not None:
            addend = jnp.pad(addend, ((0, tokens_padded - tokens), (0, 0)))
    num_tiles = (tokens_padded // tiles.tile_m) * (d_n // tiles.cta_tile_n)
    if low is not None:
        # The rank is padded with zeros to whole chunks (16 -> 32) and low_rhs goes in as
        # low_rhs^T [d_y, r]: K-major like low_lhs, so both tiles take the same swizzle and stack
        # in one smem array (a copy of r x d_y elements; the backward's a^T comes back as a).
        _check_low_rank_fits(tiles, x.dtype.itemsize)
        low_lhs, low_rhs = low
        rank = low_lhs.shape[1]
        rank_padded = tiles.low_rank_padded(rank)
        low_lhs = jnp.pad(low_lhs, ((0, tokens_padded - tokens), (0, rank_padded - rank)))
        low_rhs_t = jnp.pad(low_rhs.T, ((0, 0), (0, rank_padded - rank)))
        extra, extras, suffix = "low", (low_lhs, low_rhs_t), f"_low_rank{rank_padded}"
    elif addend is not None:
        extra, extras, suffix = "addend", (addend,), "_addend"
    else:
        extra, extras, suffix = None, (), ""
    out = plgpu.kernel(
        functools.partial(_kernel_body, tiles=tiles, transpose_w=transpose_w, extra=extra),
        out_type=jax.ShapeDtypeStruct((tokens_padded, d_n), x.dtype),
        grid=(min(_num_sms(), num_tiles),),
        grid_names=("sm",),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name="stacked_matmul_hopper" + ("_t" if transpose_w else "") + suffix,
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), x, w_stack, *extras)
    # The barrier keeps XLA from cloning this GEMM. Inside the layer scan a checkpointed output is
    # also written into the scan's residual stack (a dynamic-update-slice), and XLA:GPU's dynamic-
    # slice fusion gave that write its own copy of the custom call rather than reuse this one: a
    # Llama-3-8B "selective" step ran 13 forward GEMMs a layer instead of 7 (H200, eighth session,
    # bench/RESULTS.md). Behind the barrier the write is an ordinary copy of the output.
    out = jax.lax.optimization_barrier(out)
    return out[:tokens] if tokens_padded != tokens else out


# ---------------------------------------------------------------------------------------------
# Gradient. y = x W (W = w_stack[layer], frozen): dx = dy W^T, the same kernel with the weight
# orientation flipped (and for y = x W^T, dx = dy W). w_stack and layer get no cotangent (None:
# a symbolic zero, never materialised; the stack is frozen and layer is an integer).
# With an addend, y = round(x W + a) and dy/da is the identity (the rounding is treated as the
# identity, as everywhere in autodiff), so da = dy, already in a's dtype (a has x's dtype, as y);
# dx is unchanged: the addend does not depend on x here (the caller's own adapter term a(x) gets
# its x-gradient through its own vjp, from this da), so dx runs the flipped kernel with no addend.
# ---------------------------------------------------------------------------------------------


def _dx(d_out, w_stack, layer, transpose_w):
    return _stacked_matmul_kernel(d_out, w_stack, layer, None, not transpose_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _stacked_matmul(x, w_stack, layer, transpose_w):
    return _stacked_matmul_kernel(x, w_stack, layer, None, transpose_w)


def _stacked_matmul_fwd(x, w_stack, layer, transpose_w):
    return _stacked_matmul_kernel(x, w_stack, layer, None, transpose_w), (w_stack, layer)


def _stacked_matmul_bwd(transpose_w, residuals, d_out):
    w_stack, layer = residuals
    return _dx(d_out, w_stack, layer, transpose_w), None, None


_stacked_matmul.defvjp(_stacked_matmul_fwd, _stacked_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _stacked_matmul_plus(x, w_stack, layer, addend, transpose_w):
    return _stacked_matmul_kernel(x, w_stack, layer, addend, transpose_w)


def _stacked_matmul_plus_fwd(x, w_stack, layer, addend, transpose_w):
    return _stacked_matmul_kernel(x, w_stack, layer, addend, transpose_w), (w_stack, layer)


def _stacked_matmul_plus_bwd(transpose_w, residuals, d_out):
    w_stack, layer = residuals
    return _dx(d_out, w_stack, layer, transpose_w), None, None, d_out


_stacked_matmul_plus.defvjp(_stacked_matmul_plus_fwd, _stacked_matmul_plus_bwd)


# With a low-rank term, y = round(x W + L R) (L = low_lhs [tokens, r], R = low_rhs [r, d_y]), the
# rounding again taken as the identity: y is bilinear in (L, R), so dL = dy R^T and dR = L^T dy,
# two thin float32-accumulated GEMMs cast to L's and R's dtypes (XLA's: r columns are too few for
# this kernel's tiles), and dx = dy W^T is the flipped kernel as without the term (L R does not
# depend on x here; a LoRA caller's L = x a gets its x-gradient from dL through its own vjp). The
# residuals are L and R themselves, [tokens, r] and [r, d_y]: no [tokens, d_y] array is saved.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _stacked_matmul_low(x, w_stack, layer, low_lhs, low_rhs, transpose_w):
    return _stacked_matmul_kernel(x, w_stack, layer, None, transpose_w, low=(low_lhs, low_rhs))


def _stacked_matmul_low_fwd(x, w_stack, layer, low_lhs, low_rhs, transpose_w):
    out = _stacked_matmul_kernel(x, w_stack, layer, None, transpose_w, low=(low_lhs, low_rhs))
    return out, (w_stack, layer, low_lhs, low_rhs)


def _stacked_matmul_low_bwd(transpose_w, residuals, d_out):
    w_stack, layer, low_lhs, low_rhs = residuals
    d_low_lhs = jnp.dot(d_out, low_rhs.T, preferred_element_type=jnp.float32).astype(low_lhs.dtype)
    d_low_rhs = lax.dot_general(low_lhs, d_out, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return _dx(d_out, w_stack, layer, transpose_w), None, None, d_low_lhs, d_low_rhs.astype(low_rhs.dtype)


_stacked_matmul_low.defvjp(_stacked_matmul_low_fwd, _stacked_matmul_low_bwd)


def stacked_matmul_hopper(
    x: Float[Array, "tokens d_x"],
    w_stack: Float[Array, "layers d_in d_out"],
    layer: Int[Array, ""],
    *,
    transpose_w: bool = False,
    addend: Float[Array, "tokens d_y"] | None = None,
    low: tuple[Float[Array, "tokens rank"], Float[Array, "rank d_y"]] | None = None,
) -> Float[Array, "tokens d_y"]:
    """x @ w_stack[layer] (x [tokens, d_in] -> [tokens, d_out]) or, with transpose_w=True,
    x @ w_stack[layer].T (x [tokens, d_out] -> [tokens, d_in]), float32 accumulation, x.dtype out,
    without copying or transposing the stack. layer may be a tracer (a scan's layer index); out of
    range it is clamped, as lax.dynamic_slice does. An addend (the output's shape, x's dtype) is
    added to the float32 product before the one rounding to x.dtype. low = (low_lhs [tokens, r],
    low_rhs [r, d_y]), both x's dtype, instead adds exactly low_lhs @ low_rhs, accumulated in the
    same float32 accumulator (no scale: fold one into low_rhs), with no [tokens, d_y] array in
    memory; r is padded with zeros to a multiple of 32 (HopperMatmulTiles.low_rank_chunk), and each
    32 past the first costs every output tile one exposed TMA round trip. Differentiable in x, the
    addend and low's two operands: the stack is treated as frozen (its cotangent is a symbolic
    zero). Token counts that are not a multiple of 128 cost a padded copy of x (and of the addend
    or low_lhs); the weight is never padded (see choose_tiles for the shapes it takes)."""
    _check(x, w_stack, layer, transpose_w, addend, low)
    # Clamped as lax.dynamic_slice clamps (the reference's semantics): nothing in the kernel
    # checks the index, and what a TMA copy reads at an out-of-range layer is not to be relied on.
    layer = jnp.clip(jnp.reshape(jnp.asarray(layer, jnp.int32), ()), 0, w_stack.shape[0] - 1)
    if low is not None:
        return _stacked_matmul_low(x, w_stack, layer, *low, transpose_w)
    if addend is None:
        return _stacked_matmul(x, w_stack, layer, transpose_w)
    return _stacked_matmul_plus(x, w_stack, layer, addend, transpose_w)


def stacked_matmul_reference(
    x: Float[Array, "tokens d_x"],
    w_stack: Float[Array, "layers d_in d_out"],
    layer: Int[Array, ""],
    transpose_w: bool = False,
    *,
    addend: Float[Array, "tokens d_y"] | None = None,
    low: tuple[Float[Array, "tokens rank"], Float[Array, "rank d_y"]] | None = None,
) -> Float[Array, "tokens d_y"]:
    """The same product in XLA: a dynamic slice of the stack and a float32-accumulated jnp.dot,
    plus the addend in float32 (or low_lhs @ low_rhs, float32-accumulated), rounded once to
    x.dtype."""
    weight = lax.dynamic_index_in_dim(w_stack, layer, axis=0, keepdims=False)
    if transpose_w:
        weight = weight.T
    product = jnp.dot(x, weight, preferred_element_type=jnp.float32)
    if addend is not None:
        product = product + addend.astype(jnp.float32)
    if low is not None:
        low_lhs, low_rhs = low
        product = product + jnp.dot(low_lhs, low_rhs, preferred_element_type=jnp.float32)
    return product.astype(x.dtype)
