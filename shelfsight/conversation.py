"""A conversation: system, user and assistant turns, each a sequence of texts and pictures in order.

It is the one shape every face and step shares: the gRPC and HTTP faces build one from their messages,
the gateway checks it and keys its cache on it, Triton's `preprocess` renders it with the chat
template. Pictures travel apart from the text, as encoded files in the order they appear (a picture
part only says "the next picture here"), because bytes do not belong in JSON and the gateway checks
each picture's header on its own.

    JSON (the MESSAGES input of the Triton contract, and the cache key's view):
        [{"role": "system", "content": [{"type": "text", "text": "..."}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same product?"}]}]

The classic request (one picture, one question, an optional system prompt) is `Conversation.ask`.
Pure Python: no torch, Triton or gRPC, so every face and the core import it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from shelfsight import params
from shelfsight.errors import InvalidArgument

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
PICTURE = None  # a part that is a picture (the next one in order); any other part is text


@dataclass(frozen=True)
class Turn:
    role: str
    parts: tuple[str | None, ...]  # texts, and PICTURE where a picture goes

    @property
    def pictures(self) -> int:
        return sum(1 for p in self.parts if p is PICTURE)

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if p is not PICTURE)


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]

    @classmethod
    def ask(cls, question: str, system: str | None = None, pictures: int = 1) -> "Conversation":
        """`pictures` pictures, then the question; the system prompt first when there is one."""
        turns = [Turn(SYSTEM, (system,))] if system else []
        turns.append(Turn(USER, (PICTURE,) * pictures + (question,)))
        return cls(tuple(turns))

    @property
    def pictures(self) -> int:
        return sum(t.pictures for t in self.turns)

    def classic(self) -> tuple[str, str | None] | None:
        """(question, system) when this is the classic request - [system], then one user turn of one
        picture and one text - else None."""
        turns = self.turns[1:] if self.turns and self.turns[0].role == SYSTEM else self.turns
        if len(turns) == 1 and turns[0].role == USER and len(turns[0].parts) == 2 \
                and turns[0].parts[0] is PICTURE and turns[0].parts[1] is not PICTURE:
            return turns[0].parts[1], self.system or None
        return None

    @property
    def system(self) -> str:
        return self.turns[0].text if self.turns and self.turns[0].role == SYSTEM else ""

    def messages(self) -> list[dict]:
        """The chat template's messages (a system turn's text as a plain string, as the golden cases
        render it)."""
        out = []
        for t in self.turns:
            if t.role == SYSTEM:
                out.append({"role": SYSTEM, "content": t.text})
                continue
            out.append({"role": t.role, "content": [{"type": "image"} if p is PICTURE else {"type": "text", "text": p}
                                                    for p in t.parts]})
        return out

    def to_json(self) -> bytes:
        doc = [{"role": t.role, "content": [{"type": "image"} if p is PICTURE else {"type": "text", "text": p}
                                            for p in t.parts]} for t in self.turns]
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Conversation":
        """to_json's inverse; the structure is checked here, the rules by check()."""
        try:
            doc = json.loads(raw)
        except (ValueError, TypeError):
            raise InvalidArgument("messages is not valid JSON") from None
        if not isinstance(doc, list):
            raise InvalidArgument("messages must be a JSON list of turns")
        turns = []
        for i, turn in enumerate(doc):
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), (list, str)):
                raise InvalidArgument(f"messages[{i}] must be an object with a role and a content list")
            content = turn["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    parts.append(PICTURE)
                elif kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    raise InvalidArgument(f"messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": ...}} "
                                          "or {\"type\": \"image\"}")
            turns.append(Turn(str(turn.get("role")), tuple(parts)))
        return cls(tuple(turns))

    def check(self, limits: params.Limits) -> "Conversation":
        """The rules every face and step applies; InvalidArgument names the turn and the rule.
        Returns self."""
        turns = self.turns
        if not turns:
            raise InvalidArgument("messages is empty")
        if len(turns) > limits.max_turns:
            raise InvalidArgument(f"messages has {len(turns)} turns; the limit is {limits.max_turns}")
        chars = 0
        for i, t in enumerate(turns):
            where = f"messages[{i}]"
            if t.role not in ROLES:
                raise InvalidArgument(f"{where}.role must be one of {', '.join(ROLES)}, got {t.role!r}")
            if t.role == SYSTEM:
                if i != 0:
                    raise InvalidArgument(f"{where}: a system turn may only come first")
                if t.pictures:
                    raise InvalidArgument(f"{where}: a system turn holds text only")
                params.check_text(f"{where} (system)", t.text, limits.max_system_chars, required=False)
                continue
            if t.role == ASSISTANT and t.pictures:
                raise InvalidArgument(f"{where}: an assistant turn holds text only")
            if not t.parts or (not t.pictures and not t.text.strip()):
                raise InvalidArgument(f"{where} is empty")
            for j, p in enumerate(t.parts):
                if p is not PICTURE:
                    params.check_text(f"{where}.content[{j}]", p, limits.max_question_chars, required=False)
                    chars += len(p)
        if turns[-1].role != USER:
            raise InvalidArgument("the last turn must be the user's (the question to answer)")
        if not any(t.role == USER and t.text.strip() for t in turns) and not self.pictures:
            raise InvalidArgument("messages holds neither text nor pictures to answer about")
        if chars > limits.max_conversation_chars:
            raise InvalidArgument(f"messages hold {chars} characters of text; the limit is {limits.max_conversation_chars}")
        if self.pictures > limits.max_pictures:
            raise InvalidArgument(f"messages hold {self.pictures} pictures; the limit is {limits.max_pictures}")
        return self
