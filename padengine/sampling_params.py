"""Per-request decoding settings and their validation."""
from dataclasses import dataclass

from padengine.errors import require, require_finite, require_int


@dataclass
class SamplingParams:
    max_tokens: int = 128
    top_k: int = 10                  # base-model candidates; 0 (or >= vocab) means the whole vocabulary
    weight: float = 0.8              # PAD guidance weight w; 0 means plain top-k decoding of the base
    temperature: float = 0.0         # 0 is greedy
    seed: int | None = None          # None: derived from the engine seed and the request's arrival
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    preference_in_base: bool = True  # the base model also sees the preference (as the PAD authors do)

    def num_candidates(self, vocab_size: int) -> int:
        """The base candidates this request's rows score: top_k, or the whole vocabulary."""
        return vocab_size if self.top_k <= 0 or self.top_k >= vocab_size else self.top_k

    def validate(self, field: str, vocab_size: int) -> None:
        """Raise InvalidInput naming `field`.<attribute> for any value out of range."""
        require_int(self.max_tokens, f"{field}.max_tokens")
        require(self.max_tokens >= 1, f"{field}.max_tokens", f"must be at least 1, got {self.max_tokens}")
        require_int(self.top_k, f"{field}.top_k")
        require(self.top_k >= 0, f"{field}.top_k", f"must be >= 0 (0 = whole vocabulary), got {self.top_k}")
        require_finite(self.temperature, f"{field}.temperature")
        require(self.temperature >= 0, f"{field}.temperature", f"must be >= 0, got {self.temperature}")
        require_finite(self.weight, f"{field}.weight")
        if self.seed is not None:
            require_int(self.seed, f"{field}.seed")
            require(-2**63 <= self.seed < 2**63, f"{field}.seed", "must fit in 64 bits")
        for t in self.stop_token_ids or []:
            require_int(t, f"{field}.stop_token_ids")
            require(0 <= t < vocab_size, f"{field}.stop_token_ids", f"token id {t} is outside [0, {vocab_size})")

