"""Does a row's text survive the tokenizer? A tokenizer that lacks a character may turn it into
its unknown or padding id without a word; a model trained on such prompts sees holes, and a
reference answer holding such characters can never be produced. Checked on every prompt and
reference answer when the data is loaded.
"""

from __future__ import annotations

from typing import Any


class TokenizerCheck:
    """Finds the characters of a text that a tokenizer cannot represent."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        special = {
            tokenizer.unk_token: tokenizer.unk_token_id,
            tokenizer.pad_token: tokenizer.pad_token_id,
        }
        # A pad token that is also EOS (or any other real token) is legitimate in text only if
        # written out; the unknown token never is.
        self.holes = {i: tok for tok, i in special.items() if i is not None and tok is not None}
        self._char_ok: dict[str, bool] = {}

    def lost_ids(self, text: str) -> bool:
        """Whether ``text`` encodes to an unknown or padding id it does not spell out."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return any(i in self.holes and self.holes[i] not in text for i in ids)

    def lost(self, text: str) -> list[str]:
        """The characters of ``text`` that become unknown or padding ids (empty when none)."""
        if not self.lost_ids(text):
            return []
        return [c for c in dict.fromkeys(text) if not c.isspace() and not self._representable(c)]

    def changed(self, text: str) -> bool:
        """Whether decoding the encoded text gives something else (a normaliser at work, or
        characters dropped); leading and trailing whitespace are ignored."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        back = self.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return back.strip() != text.strip()

    def _representable(self, char: str) -> bool:
        if char not in self._char_ok:
            ids = self.tokenizer(char, add_special_tokens=False)["input_ids"]
            self._char_ok[char] = bool(ids) and not any(i in self.holes for i in ids)
        return self._char_ok[char]
