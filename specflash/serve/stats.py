"""The server's Prometheus metrics, named and defined once.

Speculative figures follow `specflash.metrics`: a verify step's acceptance length is
accepted drafts + 1; per-position counters count, for draft position i (1-based), the
verify steps that proposed a token there and those that accepted it. Server-side
times are measured from the moment a request was accepted (queueing included):
time to first token = until the first token was produced; time per output token =
(last token - first token) / (tokens - 1).
"""

from __future__ import annotations

from .prometheus import Counter, Gauge, Histogram, Registry

FINISH_REASONS = ("stop", "length", "abort", "error")

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self, block_size: int):
        self.registry = r = Registry()
        self.http_requests = Counter(r, "specflash_http_requests_total",
                                     "HTTP requests answered, by route and status code", ("route", "status"))
        self.requests_finished = Counter(
            r, "specflash_requests_finished_total",
            "Generation requests finished, by reason (stop, length, abort = client gone, error)", ("finish_reason",))
        self.requests_running = Gauge(r, "specflash_requests_running", "Generations being decoded now")
        self.requests_waiting = Gauge(r, "specflash_requests_waiting", "Generations queued for a decoding slot")
        self.prompt_tokens = Counter(r, "specflash_prompt_tokens_total", "Prompt tokens prefilled")
        self.generation_tokens = Counter(r, "specflash_generation_tokens_total", "Tokens generated")
        self.verify_steps = Counter(r, "specflash_verify_steps_total",
                                    "Target forwards after the prefill (each commits 1 + accepted tokens)")
        self.draft_tokens = Counter(r, "specflash_draft_tokens_total", "Draft tokens proposed and verified")
        self.accepted_tokens = Counter(r, "specflash_accepted_tokens_total", "Draft tokens accepted")
        self.draft_tokens_by_position = Counter(
            r, "specflash_draft_tokens_by_position_total", "Draft tokens verified at each block position (1-based)",
            ("position",))
        self.accepted_tokens_by_position = Counter(
            r, "specflash_accepted_tokens_by_position_total", "Draft tokens accepted at each block position (1-based)",
            ("position",))
        self.acceptance_length = Histogram(
            r, "specflash_acceptance_length", "Tokens committed per verify step (accepted drafts + 1)",
            buckets=range(1, max(block_size, 1) + 1))
        self.time_to_first_token = Histogram(
            r, "specflash_time_to_first_token_seconds", "From request accepted to first token (queueing included)",
            buckets=TTFT_BUCKETS)
        self.time_per_output_token = Histogram(
            r, "specflash_time_per_output_token_seconds", "Decode time per token after the first",
            buckets=TPOT_BUCKETS)
        self.request_latency = Histogram(
            r, "specflash_request_latency_seconds", "From request accepted to its last token",
            buckets=LATENCY_BUCKETS)

    def record_step(self, num_drafted: int, num_accepted: int, num_tokens: int, verify: bool) -> None:
        """One Step of the decode loop; `verify` is False for the prefill step."""
        self.generation_tokens.inc(num_tokens)
        if not verify:
            return
        self.verify_steps.inc()
        self.acceptance_length.observe(num_accepted + 1)
        if num_drafted:
            self.draft_tokens.inc(num_drafted)
            self.accepted_tokens.inc(num_accepted)
            for i in range(1, num_drafted + 1):
                self.draft_tokens_by_position.inc(position=i)
            for i in range(1, num_accepted + 1):
                self.accepted_tokens_by_position.inc(position=i)

    def render(self) -> str:
        return self.registry.render()
