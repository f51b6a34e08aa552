"""Block allocation, reference counts and the prefix cache of one pool."""
from padengine.engine.block_manager import BlockManager
from padengine.engine.sequence import Sequence


def computed(pool, seq):
    """Allocate seq and publish all its blocks, as the scheduler does for a prefill done in one step."""
    pool.allocate(seq)
    pool.publish(seq, len(seq))


def test_shared_prefix_reuses_full_blocks_only():
    pool = BlockManager(num_blocks=16, block_size=4)
    a, b = Sequence(list(range(10)), 0), Sequence(list(range(8)) + [99, 98, 97], 0)
    computed(pool, a)
    pool.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert b.block_table[2] != a.block_table[2]
    assert pool.blocks[a.block_table[0]].ref_count == 2
    pool.release(a)
    assert pool.blocks[b.block_table[0]].ref_count == 1


def test_last_token_block_is_always_computed():
    pool = BlockManager(num_blocks=8, block_size=4)
    a = Sequence(list(range(8)), 0)
    computed(pool, a)
    b = Sequence(list(range(8)), 0)                       # identical prompt: its last block is not reused
    pool.allocate(b)
    assert b.num_cached_tokens == 4 and b.block_table[1] != a.block_table[1]


def test_freed_blocks_stay_cached_until_reused():
    pool = BlockManager(num_blocks=4, block_size=4)
    a = Sequence(list(range(9)), 0)
    computed(pool, a)
    pool.release(a)
    assert pool.num_free == 4
    b = Sequence(list(range(9)), 0)
    pool.allocate(b)
    assert b.num_cached_tokens == 8
    pool.release(b)
    c = Sequence([50 + i for i in range(16)], 0)          # takes every block: old hashes are evicted
    computed(pool, c)
    pool.release(c)
    d = Sequence(list(range(9)), 0)
    pool.allocate(d)
    assert d.num_cached_tokens == 0


def decode(pool, seq, tokens):
    """Append tokens as the scheduler's decode steps do, a block whenever the last token needs one."""
    for t in tokens:
        seq.token_ids.append(t)
        pool.append_slot(seq)
        assert len(seq.block_table) == pool.blocks_needed(len(seq))


def test_decode_appends_blocks_and_publishes_filled_ones_when_released():
    pool = BlockManager(num_blocks=12, block_size=4)
    a = Sequence([1, 2, 3], 0)
    pool.allocate(a)
    decode(pool, a, range(4, 11))                         # tokens 1..10: blocks [1-4] [5-8] [9, 10]
    b = Sequence(list(range(1, 10)), 0)
    pool.allocate(b)
    assert b.num_cached_tokens == 0                       # filled during decode: not shared while a runs
    pool.release(b)
    pool.release(a)
    c = Sequence(list(range(1, 10)), 0)
    pool.allocate(c)
    assert c.num_cached_tokens == 8                       # both filled blocks, published when a ended


def test_a_filled_block_is_published_only_once_its_kv_is_computed():
    pool = BlockManager(num_blocks=12, block_size=4)
    a = Sequence([1, 2, 3], 0)
    pool.allocate(a)
    decode(pool, a, [4, 5, 6, 7, 8])                      # token 8 fills block [5-8]; its KV is next step's
    pool.release(a)
    b = Sequence(list(range(1, 10)), 0)
    pool.allocate(b)
    assert b.num_cached_tokens == 4


def test_unpublished_blocks_are_not_shared_until_their_chunk_is_scheduled():
    """A chunked prefill publishes only the blocks its scheduled chunk computes."""
    pool = BlockManager(num_blocks=16, block_size=4)
    a = Sequence(list(range(13)), 0)
    pool.allocate(a)
    pool.publish(a, 6)                                    # chunk [0, 6): only block 0 is whole
    b = Sequence(list(range(13)), 0)
    pool.allocate(b)
    assert b.num_cached_tokens == b.num_computed_tokens == 4 and b.block_table[0] == a.block_table[0]
    pool.publish(a, 12)
    c = Sequence(list(range(13)), 0)
    pool.allocate(c)
    assert c.num_cached_tokens == 12 and c.block_table[:3] == a.block_table[:3]


def test_forget_unpublishes_blocks_of_a_failed_step():
    pool = BlockManager(num_blocks=16, block_size=4)
    a = Sequence(list(range(13)), 0)
    pool.allocate(a)
    a.num_computed_tokens = 4                             # an earlier chunk ran; the next one failed
    pool.publish(a, 12)
    pool.forget(a)
    b = Sequence(list(range(13)), 0)
    pool.allocate(b)
    assert b.num_cached_tokens == 4


def test_rematch_swaps_in_blocks_published_after_allocation():
    pool = BlockManager(num_blocks=16, block_size=4)
    a, b = Sequence(list(range(13)), 0), Sequence(list(range(13)), 0)
    pool.allocate(a)
    pool.allocate(b)                                      # nothing published yet: b owns all its blocks
    own = list(b.block_table)
    pool.publish(a, 8)                                    # a's first chunk computed blocks 0 and 1
    pool.rematch(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed_tokens == 8
    assert b.block_table[2:] == own[2:] and pool.num_free == 16 - 4 - 2      # b's two copies went back
    pool.publish(a, 13)
    pool.rematch(b)                                       # block 2 now too, never the last token's block
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] == own[3] and b.num_computed_tokens == 12
