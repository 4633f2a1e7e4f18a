"""The small-batch 4-bit matmul with its weight bytes brought in by the Tensor Memory
Accelerator: `gemv_4bit`'s decode and multiply-adds, fed from a ring of shared-memory stages that
one loader warp keeps full.

In the plain GEMV each thread loads its own words, so the bytes a streaming multiprocessor has
in flight are bounded by the registers of the programs it holds (two programs of four warps at
128 registers): measured on an H200 it moves half the copy bandwidth. Here the bytes in flight
are NUM_STAGES stages per program, whatever the decoders' registers:
- the loader warp (a worker partition) walks the program's row blocks (every grid-th one, as
  the persistent GEMV does) and K steps, one TMA copy of [block_n rows, one step of words] per
  step into the stage ring, whose `ready` barrier counts the bytes;
- the decoder warps (the default partition, the GEMV's thread layout) wait for a stage, read
  their 16 bytes of each of their rows from it, hand the stage back (`free`) and decode and
  multiply as the GEMV does; after a block's last step they reduce and store its rows.
Words past K and rows past N arrive as zeros: x and the absmax are masked to zero there, and the
stores skip those rows.

The decode's byte table sits at the start of the stages' buffer, the kernel's largest and so
placed at shared offset 0, where the table's lookups read (a CPU test checks the placement)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.kernels.decode_4bit import TABLE_LAYOUT, lane_copy_offset, lane_id, store_table_at
from engine.kernels.gemv_4bit import (
    WORDS_PER_THREAD,
    accumulate,
    pair_layout,
    scale_pointers,
    step_chunks,
    store_rows,
    word_layout_of,
    x_pair_pointers,
)

TABLE_WORDS = gl.constexpr(256 * 32)  # either byte table: 32 KB


@gluon.constexpr_function
def stage_layout():
    """Shared layout of a stage's words [block_n, step_words] as TMA writes them: unswizzled rows,
    so a quarter-warp's 16-byte reads along a row touch 128 consecutive bytes."""
    return gl.NVMMASharedLayout(0, 32, 2)


@gluon.jit
def _load_partition(w_desc, ring, ready, free, num_blocks, steps, FIRST: gl.constexpr):
    """One TMA copy per (row block, K step) of this program, once the stage is free (stage s is
    slot FIRST + s of the ring)."""
    STAGES: gl.constexpr = ready.shape[0]
    block_n: gl.constexpr = w_desc.block_type.shape[0]
    step_words: gl.constexpr = w_desc.block_type.shape[1]
    i = 0
    for block in range(gl.program_id(0), num_blocks, gl.num_programs(0)):
        for s in range(steps):
            stage = i % STAGES
            # Round r of a stage waits for round r - 1's readers (a fresh barrier passes parity 1).
            mbarrier.wait(free.index(stage), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(stage), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                w_desc, [block * block_n, s * step_words], ready.index(stage),
                ring.index(FIRST + stage),
            )  # fmt: skip
            i += 1


@gluon.jit
def _decode_partition(
    x_ptr, absmax_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_a, ring, ready, free,
    num_blocks, steps, FIRST: gl.constexpr, BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr,
    BLOCK_M: gl.constexpr, ROWS: gl.constexpr, THREADS_N: gl.constexpr, WARPS_N: gl.constexpr,
    PDL: gl.constexpr, HALF_TABLE: gl.constexpr, HALF2: gl.constexpr,
):  # fmt: skip
    """Decode and multiply each landed stage (slot FIRST + s of the ring); store each block's
    rows after its last step."""
    num_warps: gl.constexpr = gl.num_warps()
    STAGES: gl.constexpr = ready.shape[0]
    block_n: gl.constexpr = ROWS * THREADS_N * WARPS_N
    chunks: gl.constexpr = step_chunks(THREADS_N, WARPS_N, num_warps)
    step_words: gl.constexpr = chunks * WORDS_PER_THREAD
    layout: gl.constexpr = pair_layout(BLOCK_M, ROWS, THREADS_N, WARPS_N, num_warps)
    word_layout: gl.constexpr = word_layout_of(BLOCK_M, ROWS, THREADS_N, WARPS_N, num_warps)
    w_layout: gl.constexpr = gl.SliceLayout(0, word_layout)  # [n, chunk, word]
    sums_layout: gl.constexpr = gl.SliceLayout(3, layout)  # [m, n, chunk]
    scale_layout: gl.constexpr = gl.SliceLayout(0, sums_layout)  # [n, chunk]
    out_layout: gl.constexpr = gl.SliceLayout(2, sums_layout)  # [m, n]
    # The same registers as w_layout over the stage's 2-D words [n, chunk * 4].
    flat_layout: gl.constexpr = gl.BlockedLayout(
        [ROWS, WORDS_PER_THREAD], [THREADS_N, 32 // THREADS_N],
        [WARPS_N, num_warps // WARPS_N], [1, 0],
    )  # fmt: skip

    rows: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    s_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, scale_layout))
    s_chunk = gl.expand_dims(s_c * WORDS_PER_THREAD, 0)
    x_ptrs, x_chunk, x_m_ok = x_pair_pointers(x_ptr, M, stride_xm, BLOCK_M, chunks, layout)
    like_words = gl.zeros([block_n, chunks, WORDS_PER_THREAD], gl.int32, w_layout)
    if HALF_TABLE or HALF2:
        copy_offset = 4 * lane_id(like_words)
    else:
        copy_offset = lane_copy_offset(like_words)
    half_kw = K // 8
    # Launched as a programmatic dependent: the loader streams weights (which no kernel of a
    # forward pass writes) while the kernel before finishes; x is read only after it has.
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    i = 0
    for block in range(gl.program_id(0), num_blocks, gl.num_programs(0)):
        n0 = block * block_n
        scale_ptrs = scale_pointers(
            absmax_ptr, n0, N, stride_a, s_chunk, BLOCKSIZE, block_n, scale_layout
        )
        acc = gl.zeros([BLOCK_M, block_n, chunks], gl.float32, layout=sums_layout)
        for s in range(steps):
            stage = i % STAGES
            mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
            # Read as plain row-major words (what an unswizzled TMA tile is): 16-byte loads.
            tile = ring.index(FIRST + stage)._reinterpret(gl.int32, [block_n, step_words], rows)
            flat = tile.load(flat_layout)
            words = gl.reshape(flat, [block_n, chunks, WORDS_PER_THREAD])
            words = gl.convert_layout(words, w_layout)  # the same registers
            mbarrier.arrive(free.index(stage), count=1)  # every decoder has its words
            acc = accumulate(
                acc, words, s * step_words, x_ptrs, x_m_ok, x_chunk, scale_ptrs, s_chunk, half_kw,
                copy_offset, BLOCKSIZE, X_FP16, word_layout, HALF_TABLE or HALF2, HALF2,
            )  # fmt: skip
            i += 1
        store_rows(acc, out_ptr, 0, n0, M, N, stride_om, 0, out_layout)
    return ()


@gluon.jit
def gemv_tma_4bit_kernel(
    w_desc, x_ptr, absmax_ptr, table_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, ROWS: gl.constexpr,
    THREADS_N: gl.constexpr, WARPS_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    PDL: gl.constexpr, HALF_TABLE: gl.constexpr, HALF2: gl.constexpr,
    LOADER_REGS: gl.constexpr,
):  # fmt: skip
    """out [M, N] = x @ W^T. w_desc: the packed weight as int32 words [N, K / 8] in blocks of
    [block_n, step_words]; x_ptr: x as int32 pairs [M, K / 2]. The grid (at most the row blocks)
    is persistent; num_warps decode, one warp loads."""
    num_warps: gl.constexpr = gl.num_warps()
    block_n: gl.constexpr = ROWS * THREADS_N * WARPS_N
    step_words: gl.constexpr = step_chunks(THREADS_N, WARPS_N, num_warps) * WORDS_PER_THREAD
    gl.static_assert(w_desc.block_type.shape[0] == block_n, "TMA block rows != block_n")
    gl.static_assert(w_desc.block_type.shape[1] == step_words, "TMA block words != one K step")
    # One buffer: the byte table, then the stages. The kernel's largest, so Triton places it
    # at shared offset 0, where the table's lookups read. Its slots are a power of two.
    slot_words: gl.constexpr = block_n * step_words
    table_slots: gl.constexpr = (TABLE_WORDS + slot_words - 1) // slot_words
    gl.static_assert(
        (table_slots + NUM_STAGES) & (table_slots + NUM_STAGES - 1) == 0,
        "the table's slots and the stages must add up to a power of two",
    )
    ring_words: gl.constexpr = (table_slots + NUM_STAGES) * slot_words
    buffer = gl.allocate_shared_memory(gl.int32, [ring_words // 32, 32, 1], TABLE_LAYOUT)
    store_table_at(buffer, table_ptr, HALF_TABLE or HALF2, num_warps)
    ring = buffer._reinterpret(
        gl.int32, [table_slots + NUM_STAGES, block_n, step_words], w_desc.layout
    )
    # Stage s is slot table_slots + s of the ring.
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(free.index(s), count=1)
    fence_async_shared()  # the barriers are initialised before TMA signals them

    num_blocks = gl.cdiv(N, block_n)
    steps = gl.cdiv(K // 8, step_words)
    gl.warp_specialize(
        [
            (
                _decode_partition,
                (x_ptr, absmax_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_a, ring,
                 ready, free, num_blocks, steps, table_slots, BLOCKSIZE, X_FP16, BLOCK_M, ROWS,
                 THREADS_N, WARPS_N, PDL, HALF_TABLE, HALF2),
            ),
            (_load_partition, (w_desc, ring, ready, free, num_blocks, steps, table_slots)),
        ],
        [1],
        [LOADER_REGS],
    )  # fmt: skip
