"""The server's Prometheus metrics, named and defined once, kept by `prometheus_client`.

Each `ServerMetrics` has its own `CollectorRegistry` (never the process-wide default),
so several apps in one process (tests, notebooks) count separately.

Speculative figures follow `specflash.metrics`: a verify step's acceptance length is
accepted drafts + 1; per-position counters count, for draft position i (1-based), the
verify steps that proposed a token there and those that accepted it. Server-side
times are measured from the moment a request was accepted (queueing included):
time to first token = until the first token was produced; time per output token =
(last token - first token) / (tokens - 1).

Target forwards: `record_forward(requests, rows)` is called once per forward of the
target, whatever ran it: `requests` is the number of generations the forward served
(its batch size), `rows` the positions it computed for all of them together (a
prefill: one per prompt token; a verify step: the anchor plus the drafts it checks).
While the engine runs one generation per forward, the batch size is always 1.
"""

from __future__ import annotations

from collections.abc import Iterator

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # pragma: no cover - the serve extra installs it
    from ..errors import InputError

    raise InputError("specflash serve needs prometheus_client: pip install 'specflash[serve]'") from None

FINISH_REASONS = ("stop", "length", "abort", "error")

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FORWARD_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)

__all__ = ["CONTENT_TYPE", "FINISH_REASONS", "ServerMetrics"]


class _WithoutCreated:
    """The registry's families less their `_created` samples (a timestamp per label set
    that the 0.0.4 text format would write as extra gauges: clutter, not data)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator:
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class ServerMetrics:
    def __init__(self, block_size: int):
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter(
            "specflash_http_requests_total", "HTTP requests answered, by route and status code", ("route", "status"),
            registry=r)
        self.requests_finished = Counter(
            "specflash_requests_finished_total",
            "Generation requests finished, by reason (stop, length, abort = client gone, error)", ("finish_reason",),
            registry=r)
        self.requests_running = Gauge("specflash_requests_running", "Generations being decoded now", registry=r)
        self.requests_waiting = Gauge("specflash_requests_waiting", "Generations queued for a decoding slot",
                                      registry=r)
        self.prompt_tokens = Counter("specflash_prompt_tokens_total", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("specflash_generation_tokens_total", "Tokens generated", registry=r)
        self.verify_steps = Counter("specflash_verify_steps_total",
                                    "Target forwards after the prefill (each commits 1 + accepted tokens)", registry=r)
        self.draft_tokens = Counter("specflash_draft_tokens_total", "Draft tokens proposed and verified", registry=r)
        self.accepted_tokens = Counter("specflash_accepted_tokens_total", "Draft tokens accepted", registry=r)
        self.draft_tokens_by_position = Counter(
            "specflash_draft_tokens_by_position_total", "Draft tokens verified at each block position (1-based)",
            ("position",), registry=r)
        self.accepted_tokens_by_position = Counter(
            "specflash_accepted_tokens_by_position_total", "Draft tokens accepted at each block position (1-based)",
            ("position",), registry=r)
        self.acceptance_length = Histogram(
            "specflash_acceptance_length", "Tokens committed per verify step (accepted drafts + 1)",
            buckets=tuple(range(1, max(block_size, 1) + 1)), registry=r)
        self.time_to_first_token = Histogram(
            "specflash_time_to_first_token_seconds", "From request accepted to first token (queueing included)",
            buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "specflash_time_per_output_token_seconds", "Decode time per token after the first",
            buckets=TPOT_BUCKETS, registry=r)
        self.request_latency = Histogram(
            "specflash_request_latency_seconds", "From request accepted to its last token",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "specflash_batch_size", "Generations served by each target forward (prefills and verify steps)",
            buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.forward_rows = Histogram(
            "specflash_forward_rows",
            "Positions each target forward computed, all its generations together (a prefill: its prompt tokens; "
            "a verify step: 1 + drafts)", buckets=FORWARD_ROWS_BUCKETS, registry=r)
        # Zero series from the start, so rates and ratios exist before the first event.
        for reason in FINISH_REASONS:
            self.requests_finished.labels(finish_reason=reason)
        for i in range(1, max(block_size, 1)):
            self.draft_tokens_by_position.labels(position=i)
            self.accepted_tokens_by_position.labels(position=i)
        self._exposed = _WithoutCreated(r)

    def record_forward(self, requests: int, rows: int) -> None:
        """One forward of the target that served `requests` generations and computed
        `rows` positions for them together."""
        self.batch_size.observe(requests)
        self.forward_rows.observe(rows)

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
                self.draft_tokens_by_position.labels(position=i).inc()
            for i in range(1, num_accepted + 1):
                self.accepted_tokens_by_position.labels(position=i).inc()

    def value(self, name: str, **labels: object) -> float:
        """The current value of one sample (`specflash_verify_steps_total`,
        `specflash_acceptance_length_count`, ...); 0 for a series not yet written."""
        found = self.registry.get_sample_value(name, {k: str(v) for k, v in labels.items()})
        return 0.0 if found is None else found

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        return generate_latest(self._exposed).decode("utf-8")
