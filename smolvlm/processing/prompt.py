"""Expand each `<image>` of a prompt into the tokens that stand for the image's frames (the reference's
`replace_image_token` of Idefics3Processor / SmolVLMProcessor).

Split image (R rows x C cols of tiles, then the global image), N = image_seq_len:

    for each row r, for each col c:  <fake_token_around_image><row_r_col_c><image>*N     then "\\n" after each row
    "\\n" <fake_token_around_image><global-img><image>*N<fake_token_around_image>

Unsplit image (R = C = 0): `<fake_token_around_image><global-img><image>*N<fake_token_around_image>`.
The last row's "\\n" and the one before the global image make "\\n\\n", a single token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageTokens:
    """The strings of the image prompt, from tokenizer_config.json (defaults are the reference's)."""

    image: str = "<image>"
    fake_around: str = "<fake_token_around_image>"
    global_image: str = "<global-img>"


def image_block(seq_len: int, tokens: ImageTokens) -> str:
    """The unsplit image prompt (one frame): also what each video frame becomes."""
    return tokens.fake_around + tokens.global_image + tokens.image * seq_len + tokens.fake_around


def image_prompt(rows: int, cols: int, seq_len: int, tokens: ImageTokens) -> str:
    """The text that replaces one `<image>` for an image cut into rows x cols tiles (0 x 0: not split)."""
    if rows == 0 and cols == 0:
        return image_block(seq_len, tokens)
    tiles = tokens.image * seq_len
    text = "".join(
        "".join(f"{tokens.fake_around}<row_{r + 1}_col_{c + 1}>{tiles}" for c in range(cols)) + "\n"
        for r in range(rows)
    )
    return text + "\n" + image_block(seq_len, tokens)


def expand_images(texts: list[str], rows: list[list[int]], cols: list[list[int]], seq_len: int,
                  tokens: ImageTokens) -> list[str]:
    """Replace the i-th `<image>` of texts[b] by the prompt of image i of sample b (counts already checked)."""
    expanded = []
    for text, sample_rows, sample_cols in zip(texts, rows, cols):
        pieces = text.split(tokens.image)
        out = [pieces[0]]
        for piece, r, c in zip(pieces[1:], sample_rows, sample_cols):
            out += [image_prompt(r, c, seq_len, tokens), piece]
        expanded.append("".join(out))
    return expanded
