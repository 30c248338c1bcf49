"""The prompts of the retrieval models, as their reference implementation writes them
(shared/notes/retrieval.md), in the chat messages the checkpoint's template renders.

Embedding (Qwen3-VL-Embedding): the instruction is the system turn; the user turn holds the pictures,
then the text ("NULL" when there is neither). The embedding is the final hidden state at the last
token, L2-normalised; its first d dimensions, normalised again, are the Matryoshka embedding of size d.

Reranking (Qwen3-VL-Reranker): a fixed system turn asks for "yes" or "no"; the user turn holds the
instruction, the query's parts after "<Query>:" and the document's after "\\n<Document>:". The score is
sigmoid((w_yes - w_no) . h), h the final hidden state at the last token, w the lm_head rows of the two
answers: one forward, no decoding.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from shelfsight import params
from shelfsight.errors import InvalidArgument

EMBED_INSTRUCTION = "Represent the user's input."
RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
RERANK_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                 'Note that the answer can only be "yes" or "no".')
YES, NO = "yes", "no"
EMPTY = "NULL"  # what the reference embeds for an input with neither text nor pictures
MAX_INSTRUCTION_CHARS = 1000


@dataclass(frozen=True)
class Side:
    """One side of a retrieval input: pictures (counted; their bytes travel apart) and text."""
    pictures: int = 0
    text: str = ""

    def parts(self) -> list[dict]:
        return [{"type": "image"}] * self.pictures + ([{"type": "text", "text": self.text}] if self.text else [])


def instruction(text: str | None, default: str) -> str:
    """The instruction as the reference writes it: trimmed, ending in punctuation."""
    text = (text or "").strip() or default
    params.check_text("instruction", text, MAX_INSTRUCTION_CHARS, required=True)
    if not unicodedata.category(text[-1]).startswith("P"):
        text += "."
    return text


def check_side(name: str, side: Side, limits: params.Limits) -> Side:
    params.check_text(f"{name} text", side.text, limits.max_question_chars, required=False)
    if side.pictures > limits.max_pictures:
        raise InvalidArgument(f"{name} has {side.pictures} pictures; the limit is {limits.max_pictures}")
    return side


def embedding_messages(item: Side, instruct: str | None = None) -> list[dict]:
    content = item.parts() or [{"type": "text", "text": EMPTY}]
    return [{"role": "system", "content": [{"type": "text", "text": instruction(instruct, EMBED_INSTRUCTION)}]},
            {"role": "user", "content": content}]


def rerank_messages(query: Side, document: Side, instruct: str | None = None) -> list[dict]:
    def side(prefix: str, s: Side) -> list[dict]:
        return [{"type": "text", "text": prefix}] + (s.parts() or [{"type": "text", "text": EMPTY}])

    content = [{"type": "text", "text": "<Instruct>: " + instruction(instruct, RERANK_INSTRUCTION)}]
    content += side("<Query>:", query) + side("\n<Document>:", document)
    return [{"role": "system", "content": [{"type": "text", "text": RERANK_SYSTEM}]},
            {"role": "user", "content": content}]
