"""Block allocation in one KV pool: reference counts and prefix caching.

A full block is identified by a chained hash of its tokens and of every token before it, so two
streams that start with the same tokens share those blocks (a preference preamble, a repeated prompt).
A block is published (findable) only once the step that computes it is scheduled (`publish`): a
stream admitted later in the same step reads it after the forward has written it, and a chunked
prefill's later blocks stay private until their chunk runs. Freed blocks keep their hash and content
until they are handed out again, so the cache also serves requests that arrive after the first one
finished. The least recently freed block is reused first.
"""
import hashlib
from collections import OrderedDict
from array import array

from padengine.engine.sequence import Sequence


def chain_hash(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


class Block:
    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.tokens: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}      # hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, reusing published full blocks for its prefix. The block
        holding the last token is never taken from the cache: at least that token must be computed.
        New full blocks get their hash now and are published by `publish`."""
        assert not seq.block_table
        bs, prev, hit = self.block_size, b"", True
        seq.num_cached_tokens = 0
        for i in range(self.blocks_needed(len(seq))):
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            full = len(tokens) == bs
            h = chain_hash(prev, tokens) if full else None
            block_id = self.cached.get(h) if hit and full and (i + 1) * bs < len(seq) else None
            if block_id is not None and self.blocks[block_id].tokens == tokens:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self.free[block_id]
                block.ref_count += 1
                seq.num_cached_tokens += bs
            else:
                hit = False
                block = self._take()
                if full:
                    block.hash, block.tokens = h, list(tokens)
            seq.block_table.append(block.id)
            prev = h or b""
        seq.num_computed_tokens = seq.num_cached_tokens

    def rematch(self, seq: Sequence) -> None:
        """Swap published blocks in for seq's own not yet computed ones, where another stream has
        published the same prefix since seq was allocated (a reward prompt equal to the base prompt,
        whose prefill advances chunk by chunk): seq skips computing them."""
        bs = self.block_size
        i = seq.num_computed_tokens // bs
        while seq.num_computed_tokens == i * bs and (i + 1) * bs < len(seq):    # never the last token's
            own = self.blocks[seq.block_table[i]]
            found = self.cached.get(own.hash) if own.hash is not None else None
            if found is None or found == own.id or self.blocks[found].tokens != own.tokens:
                return
            own.ref_count -= 1
            if own.ref_count == 0:
                self.free[own.id] = None
            block = self.blocks[found]
            if block.ref_count == 0:
                del self.free[found]
            block.ref_count += 1
            seq.block_table[i] = found
            seq.num_computed_tokens += bs
            i += 1

    def publish(self, seq: Sequence, num_tokens: int) -> None:
        """Make seq's full blocks within its first num_tokens tokens findable by later allocations."""
        for block_id in seq.block_table[:num_tokens // self.block_size]:
            block = self.blocks[block_id]
            if block.hash is not None:
                self.cached.setdefault(block.hash, block_id)

    def release(self, seq: Sequence) -> None:
        """Free seq's blocks, publishing first the ones its decode steps filled."""
        self._hash_filled(seq)
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_cached_tokens = seq.num_computed_tokens = 0

    def _hash_filled(self, seq: Sequence) -> None:
        """Hash and publish the blocks seq's decode steps filled (`append_slot` noted them). Deferred to
        here, off the per-step loop, as SGLang caches a request's decoded tokens when it ends; until
        then only its prompt is shared."""
        bs = self.block_size
        for i in seq.filled:
            prev = self.blocks[seq.block_table[i - 1]].hash if i > 0 else b""
            if prev is not None:        # a block whose prefix has no hash gets none either
                block = self.blocks[seq.block_table[i]]
                block.tokens = seq.token_ids[i * bs:(i + 1) * bs]
                block.hash = chain_hash(prev, block.tokens)
                self.cached.setdefault(block.hash, block.id)
        seq.filled = []

    def forget(self, seq: Sequence) -> None:
        """Drop the cache entries of seq's blocks past its computed tokens: they were published for a
        step that failed, so their KV was never written and later requests must not reuse them (streams
        that took them in that step are preempted by the engine)."""
        for block_id in seq.block_table[seq.num_computed_tokens // self.block_size:]:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.tokens = None, []

    def needs_block(self, seq: Sequence) -> bool:
        """Whether the next step (which writes the KV of seq's last token) needs a new block."""
        return len(seq) > len(seq.block_table) * self.block_size

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the last token's KV; note the block the previous step filled (whose tokens are
        all read back and computed), to hash when seq is released."""
        n = len(seq) - 1            # tokens already in the cache
        if n % self.block_size == 0 and n > 0:
            seq.filled.append(n // self.block_size - 1)
        if self.needs_block(seq):
            seq.block_table.append(self._take().id)

    def _take(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.tokens, block.ref_count = None, [], 1
        return block
