"""Block allocation in one KV pool: reference counts and prefix caching.

A full block is identified by a chained hash of its tokens and of every token before it, so two
streams that start with the same tokens share those blocks (a preference preamble, a repeated prompt).
Freed blocks keep their hash and content until they are handed out again, so the cache also serves
requests that arrive after the first one finished. The least recently freed block is reused first.
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
        """Give `seq` blocks for all its tokens, reusing cached full blocks for its prefix. The block
        holding the last token is never taken from the cache: at least that token must be computed."""
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
                    self._register(block, h, tokens)
            seq.block_table.append(block.id)
            prev = h or b""

    def release(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_cached_tokens = 0

    def forget(self, seq: Sequence) -> None:
        """Drop the cache entries of seq's freshly allocated blocks: `allocate` hashes full blocks before
        their KV is computed, so a step that fails must not leave them for later requests to reuse."""
        for block_id in seq.block_table[seq.num_cached_tokens // self.block_size:]:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.tokens = None, []

    def needs_block(self, seq: Sequence) -> bool:
        """Whether the next step (which writes the KV of seq's last token) needs a new block."""
        return len(seq) > len(seq.block_table) * self.block_size

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the last token's KV; hash the block that the previous step filled."""
        bs, n = self.block_size, len(seq) - 1      # n tokens are already in the cache
        if n % bs == 0 and n > 0:
            prev = (self.blocks[seq.block_table[-2]].hash or b"") if len(seq.block_table) > 1 else b""
            tokens = seq.token_ids[n - bs:n]
            self._register(self.blocks[seq.block_table[-1]], chain_hash(prev, tokens), tokens)
        if self.needs_block(seq):
            seq.block_table.append(self._take().id)

    def _take(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.tokens, block.ref_count = None, [], 1
        return block

    def _register(self, block: Block, h: bytes, tokens: list[int]) -> None:
        block.hash, block.tokens = h, list(tokens)
        self.cached[h] = block.id
