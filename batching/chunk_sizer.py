"""How many prompt tokens a step takes beside decoding rows, sized by measured step time: a step that carries a
prompt chunk should last at most SLOWDOWN times a step of the decoding rows alone, on any machine. What a prompt
token costs against a decoding row depends on the machine (compute against memory bandwidth, and how well its
attention kernels run: on a 2-core AVX512-BF16 CPU four prompt tokens 2,500 positions into a prompt add more than
the FLOP count says) and on the model, so a constant token count cannot keep the streams beside a long prompt at a
known pace. Running averages can: the step time of the decoding rows alone (by how many decode), and the time a
unit of the scheduler's prompt cost adds to it, which follows the chunks as they move deeper into a prompt."""

from __future__ import annotations

SLOWDOWN = 2.0  # a step with a prompt chunk against one of the decoding rows alone (the longest gap, jitter included,
# then stays within 3x the median)
SMOOTHING = 0.25  # the weight of the latest step in the running averages
FEWEST_TOKENS = 4  # a floor, so that a long prompt always advances by a useful chunk


class ChunkSizer:
    def __init__(self, most_tokens: int) -> None:
        self.most_tokens = most_tokens
        self._decode_seconds: dict[int, float] = {}  # by decoding rows
        self._seconds_per_cost: float | None = None

    def tokens(self, decoding_rows: int) -> int:
        """The prompt budget beside `decoding_rows` decoding rows, in the scheduler's prompt cost: what adds
        (SLOWDOWN - 1) times their own step time; the most until a step with a chunk has been measured."""
        decode_seconds = self.decode_seconds(decoding_rows)
        if decode_seconds is None or not self._seconds_per_cost:
            return self.most_tokens
        affordable = (SLOWDOWN - 1) * decode_seconds / self._seconds_per_cost
        return min(self.most_tokens, max(FEWEST_TOKENS, int(affordable)))

    def observe(self, seconds: float, decoding_rows: int, prompt_cost: float) -> None:
        """A step's wall time, its decoding rows and the prompt cost of the chunks beside them."""
        if not decoding_rows:
            return
        if not prompt_cost:
            self._decode_seconds[decoding_rows] = _averaged(self._decode_seconds.get(decoding_rows), seconds)
            return
        decode_seconds = self.decode_seconds(decoding_rows)
        if decode_seconds is not None:
            self._seconds_per_cost = _averaged(self._seconds_per_cost,
                                               max(seconds - decode_seconds, 0.0) / prompt_cost)

    def decode_seconds(self, rows: int) -> float | None:
        """The measured step time of the nearest number of decoding rows alone, if any was measured."""
        if not self._decode_seconds:
            return None
        return self._decode_seconds[min(self._decode_seconds, key=lambda measured: abs(measured - rows))]


def _averaged(average: float | None, value: float) -> float:
    return value if average is None else average + SMOOTHING * (value - average)
