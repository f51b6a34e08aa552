"""Per-request decoding settings and their validation."""
from dataclasses import dataclass

from padengine.errors import require, require_finite, require_int, require_range

MAX_WEIGHT = 100.0          # |PAD weight| bound: w times a log-softmax difference stays far from overflow
MIN_TEMPERATURE = 1e-3      # below it (but above 0, greedy), score / T could overflow float32
MAX_TEMPERATURE = 100.0
MAX_TOP_LOGPROBS = 20
MAX_N = 128


@dataclass
class SamplingParams:
    max_tokens: int = 128
    top_k: int = 10                  # base-model candidates; 0 (or >= vocab) means the whole vocabulary
    weight: float = 0.8              # PAD guidance weight w; 0 means plain top-k decoding of the base
    temperature: float = 0.0         # 0 is greedy
    top_p: float = 1.0               # nucleus filter over the PAD distribution (after the score, before the draw)
    min_p: float = 0.0               # drop candidates below min_p times the most likely one's probability
    repetition_penalty: float = 1.0  # vLLM's semantics: on prompt and generated tokens, both models' logits
    presence_penalty: float = 0.0    # minus this once for every token generated so far
    frequency_penalty: float = 0.0   # minus this times how often a token was generated so far
    top_logprobs: int = 0            # alternatives (id, log-probability) returned per generated token
    base_logprobs: bool = False      # also return the base model's own log-probability of each token
    n: int = 1                       # choices per prompt: one request group sharing the prompt's prefill
    seed: int | None = None          # None: derived from the engine seed and the request's arrival
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    preference_in_base: bool = True  # the base model also sees the preference (as the PAD authors do)

    def num_candidates(self, vocab_size: int) -> int:
        """The base candidates this request's rows score: top_k, or the whole vocabulary."""
        return vocab_size if self.top_k <= 0 or self.top_k >= vocab_size else self.top_k

    @property
    def filters(self) -> bool:
        """top_p or min_p removes candidates from the PAD distribution."""
        return self.top_p < 1.0 or self.min_p > 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, field: str, vocab_size: int) -> None:
        """Raise InvalidInput naming `field`.<attribute> for any value out of range."""
        require_int(self.max_tokens, f"{field}.max_tokens")
        require(self.max_tokens >= 1, f"{field}.max_tokens", f"must be at least 1, got {self.max_tokens}")
        require_int(self.top_k, f"{field}.top_k")
        require(self.top_k >= 0, f"{field}.top_k", f"must be >= 0 (0 = whole vocabulary), got {self.top_k}")
        require_finite(self.temperature, f"{field}.temperature")
        require(self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE,
                f"{field}.temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {self.temperature}")
        require_range(self.weight, -MAX_WEIGHT, MAX_WEIGHT, f"{field}.weight")
        require_finite(self.top_p, f"{field}.top_p")
        require(0 < self.top_p <= 1, f"{field}.top_p", f"must be in (0, 1], got {self.top_p}")
        require_range(self.min_p, 0.0, 1.0, f"{field}.min_p")
        require_finite(self.repetition_penalty, f"{field}.repetition_penalty")
        require(0 < self.repetition_penalty <= 100, f"{field}.repetition_penalty",
                f"must be in (0, 100], got {self.repetition_penalty}")
        require_range(self.presence_penalty, -2.0, 2.0, f"{field}.presence_penalty")
        require_range(self.frequency_penalty, -2.0, 2.0, f"{field}.frequency_penalty")
        require_int(self.top_logprobs, f"{field}.top_logprobs")
        require(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"{field}.top_logprobs",
                f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        require(isinstance(self.base_logprobs, bool), f"{field}.base_logprobs", "must be a bool")
        require_int(self.n, f"{field}.n")
        require(1 <= self.n <= MAX_N, f"{field}.n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.seed is not None:
            require_int(self.seed, f"{field}.seed")
            require(-2**63 <= self.seed < 2**63, f"{field}.seed", "must fit in 64 bits")
        for t in self.stop_token_ids or []:
            require_int(t, f"{field}.stop_token_ids")
            require(0 <= t < vocab_size, f"{field}.stop_token_ids", f"token id {t} is outside [0, {vocab_size})")
