"""A row: one request as the engine runs it, and the chunk of it one step computes.

A row's positions are `[soft prompt ; prompt ; generated tokens]`: positions
0..num_virtual_tokens-1 are the adapter's, the rest are `tokens`. The first
num_shared_positions of them are read from a prefix entry's `borrowed_blocks`, the others live in
the row's `own_blocks`, taken one by one from the `num_reserved_blocks` it was promised at
admission (app.engine.slots). Every field is written on the engine's thread only.
"""

from dataclasses import dataclass, field

from app.engine.detokenize import IncrementalDetokenizer
from app.engine.prefix_cache import PrefixKey
from app.engine.requests import GenerationRequest, GenerationResult
from app.engine.sampling import RowSampling


@dataclass(eq=False)
class Row:
    request: GenerationRequest
    handle: object  # whatever the caller wants back with this row's events
    prefix_key: PrefixKey
    num_virtual_tokens: int  # the soft prompt's length
    tokens: list[int]  # the prompt, then generated tokens
    sampling: RowSampling
    detokenizer: IncrementalDetokenizer
    result: GenerationResult
    enqueued_at: float
    slot_table_row: int = -1  # its row of the slot table while it runs
    num_computed_positions: int = 0  # positions whose keys and values are cached
    num_shared_positions: int = 0  # positions read from a prefix entry
    own_blocks: list[int] = field(default_factory=list)  # in position order
    borrowed_blocks: list[int] = field(default_factory=list)  # a prefix entry's blocks this row reads
    num_reserved_blocks: int = 0  # promised to this row and not yet taken
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    num_steps: int = 0  # engine steps this row was part of
    num_step_rows: int = 0  # the rows of those steps, summed (over num_steps: its mean batch size)
    error: BaseException | None = None

    @property
    def num_positions(self) -> int:
        """Positions known: soft prompt, prompt and generated tokens (the newest not yet cached)."""
        return self.num_virtual_tokens + len(self.tokens)

    @property
    def num_prompt_positions(self) -> int:
        return self.num_virtual_tokens + self.result.prompt_tokens

    def forget_blocks(self) -> None:
        """Hold no blocks and no promise of any (the caller has released them, or reset the pool)."""
        self.own_blocks, self.borrowed_blocks, self.num_reserved_blocks = [], [], 0


@dataclass
class ScheduledChunk:
    """Positions of one row that one step computes."""

    row: Row
    start: int  # its first position
    num_positions: int
    offset: int  # index of its first position in the step's flat sequence

    @property
    def end(self) -> int:
        return self.start + self.num_positions
