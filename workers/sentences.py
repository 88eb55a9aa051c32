"""Cut a streaming LLM answer into sentences, and turn a sentence into speakable text.

``SentenceCutter`` lets the speaker start on the first sentence while the model is
still writing the rest. A sentence goes out as soon as its end is certain, and at
the latest in the ``feed()`` call that brings the first non-space character of the
next sentence: every decision looks at most one visible character past the end
mark, so nothing is held back for "maybe" longer than that.

Where a sentence ends (the classic quickstart cuts at ``. ! ? ; 。！？；`` and
newline; this cutter refines the Latin marks):

- A newline always ends a sentence: list items, headings and paragraphs are
  sentences of their own.
- ``。！？；`` end a sentence with nothing after them (CJK needs no space).
- ``. ! ? …`` (and runs such as ``?!`` or ``...``) end a sentence when followed by
  whitespace and then a character that is not a lowercase letter. Directly
  followed by anything else (``3.14``, ``v1.2.3``, ``example.com/a.b``,
  ``john.doe@mail.com``, ``?q=1``) they are inside a word. A following lowercase
  letter means the sentence goes on (``etc. to``, ``"Really?" she asked``).
- Closing quotes, brackets, markdown emphasis marks and glued emoji right after
  the mark belong to the sentence that ends (``He said "hi."``).
- ``;`` ends a sentence when whitespace follows (the quickstart's rule).
- An inverted ``¿`` or ``¡`` opens a new sentence even when glued to the mark.
- A single ``.`` before a capital letter is not an end after a title
  (``Dr. Smith``), after ``e.g.``/``i.e.``/``vs.``, after a list number at the
  start of a line (``1. Mix``), after ``No.``/``Fig.``/``p.`` before a digit, or
  after a name initial (``J. R. R. Tolkien``; an initial is a capital letter whose
  previous word is capitalized, absent, or introduces a name like "by", and is
  not a label such as "Plan" or "Option"). Place abbreviations (``U.S.``,
  ``U.K.``) end before a capital, since "in the U.S. The" is likelier from a
  model than "the U.S. Army".
- Ellipses: ``Well... I think so.`` is two sentences ("Well..." is spoken with
  its trailing pause and the speaker starts sooner); ``Well... maybe not.`` is
  one, the lowercase word showing the thought goes on.

The first piece of an answer may be a clause (``first_clause_words``): a comma,
colon or dash followed by a space ends it once it holds that many words ("The
planet closest to the Sun is Mercury," then "which orbits…"). The voice starts
on the clause while the model writes the rest: the first sentence of a small
model's answer is often 15–25 tokens long, a clause a third of that
(``split_clauses`` below does the same for the voice, once a sentence is whole).
Only the first piece: after it the voice is ahead of the model, and whole
sentences sound better.

``speakable`` strips what a voice should not read (markdown, code fences, emoji)
and spells out what it should (URLs, e-mail addresses, common symbols).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

__all__ = ["SentenceCutter", "ends_mid_sentence", "speakable"]

_Verdict = Literal["end", "go", "wait"]

_CJK_MARKS = frozenset("。！？；｡")
_END_MARKS = frozenset(".!?;…") | _CJK_MARKS
_NEWLINES = frozenset("\n\r\u2028\u2029")
_CLAUSE_MARKS = frozenset(",:—")  # as _CLAUSE_BREAK below: ";" ends a sentence already
_CLOSERS = frozenset("\"'”’»)]}」』》）】〕*_`")
_INVERTED = frozenset("¿¡")
_OPENERS = "\"'“‘«([{¿¡*_`"

# Capitalized titles that are almost always followed by a name.
_TITLES = frozenset(
    "mr mrs ms mx dr prof st mt ft sen rep gov gen col capt lt sgt rev hon pres messrs".split()
)
# Latin abbreviations that never end a sentence in model prose.
_NEVER_END = frozenset(["e.g", "i.e", "vs", "cf", "viz"])
# Abbreviations that go on when a number follows ("No. 5", "p. 12", "approx. 3").
_BEFORE_NUMBER = frozenset("no nos nr vol fig figs p pp ch sec art approx ca op eq".split())
_INITIALS = re.compile(r"(?:[A-Z]\.)*[A-Z]")
_PLACES = frozenset(["U.S", "U.K", "U.N", "E.U", "D.C", "U.S.A", "U.A.E"])
# Lowercase words after which a capital initial is a name, not a sentence end.
_NAME_INTRO = frozenset(
    "by author writer novelist poet president named called actor actress director "
    "singer composer painter scientist physicist".split()
)
# Words that label a letter ("Plan B.", "Option C."): the letter is no initial.
_LETTER_LABELS = frozenset(
    "plan option answer choice grade type group class part section appendix exhibit "
    "vitamin model row column step phase level".split()
)


def _is_closer(ch: str) -> bool:
    """Whether ``ch`` right after an end mark still belongs to the ending sentence."""
    if ch in _CLOSERS:
        return True
    # Glued emoji ("Great job!🎉") and their modifiers stay with their sentence.
    return unicodedata.category(ch) in ("So", "Sk", "Mn", "Me", "Cf") and not ch.isspace()


class SentenceCutter:
    """Incremental sentence splitter for a stream of text chunks.

    ``feed`` returns the sentences a chunk completed; ``flush`` returns what is
    left when the stream ends and resets the cutter for the next stream.
    Sentences are stripped and never empty. With ``first_clause_words`` > 0 the
    first piece of each stream may end at a clause mark (see the module doc).
    """

    def __init__(self, first_clause_words: int = 0) -> None:
        self.first_clause_words = first_clause_words
        self._buf = ""
        # Where scanning resumes inside _buf; everything before it is decided.
        self._pos = 0
        self._pieces = 0  # pieces out of this stream so far

    def feed(self, chunk: str) -> list[str]:
        """Add a chunk; return the sentences whose end is now certain."""
        self._buf += chunk
        return self._scan()

    def flush(self) -> list[str]:
        """End the stream: whatever is pending is the last sentence."""
        # A pending decision only ever waits on look-ahead, so the rest of the
        # buffer is marks, closers and spaces: one sentence at most.
        rest = self._buf.strip()
        self._buf, self._pos, self._pieces = "", 0, 0
        return [rest] if rest else []

    def _scan(self) -> list[str]:
        out: list[str] = []
        buf, i, start, n = self._buf, self._pos, 0, len(self._buf)
        while i < n:
            ch = buf[i]
            if ch in _NEWLINES:
                _emit(out, buf[start:i])
                start = i = i + 1
            elif ch in _END_MARKS:
                verdict, after = self._judge(buf, start, i)
                if verdict == "wait":
                    break
                if verdict == "end":
                    _emit(out, buf[start:after])
                    start = after
                i = after
            elif ch in _CLAUSE_MARKS and self._pieces + len(out) == 0 and self.first_clause_words > 0:
                if i + 1 == n:
                    break  # "1,000" or "Mercury, which": the next character decides
                if buf[i + 1].isspace() and len(buf[start:i].split()) >= self.first_clause_words:
                    _emit(out, buf[start:i + 1])
                    start = i + 1
                i += 1
            else:
                i += 1
        self._buf = buf[start:]
        self._pos = i - start
        self._pieces += len(out)
        return out

    def _judge(self, buf: str, start: int, mark: int) -> tuple[_Verdict, int]:
        """Decide the mark run at ``mark``: ("end"|"go"|"wait", index after it)."""
        n = len(buf)
        j = mark
        while j < n and buf[j] in _END_MARKS:
            j += 1
        k = j
        while k < n and _is_closer(buf[k]):
            k += 1
        if k == n:
            return "wait", k
        run, nxt = buf[mark:j], buf[k]
        if any(c in _CJK_MARKS for c in run) or nxt in _INVERTED:
            return "end", k
        if not nxt.isspace():
            return "go", k
        m = k
        while m < n and buf[m].isspace() and buf[m] not in _NEWLINES:
            m += 1
        if (m < n and buf[m] in _NEWLINES) or ";" in run:
            return "end", k
        if m == n:
            return "wait", k
        first = buf[m]
        if run == "." and k == j and _period_goes_on(buf[start:mark], first):
            return "go", k
        return ("go" if first.islower() else "end"), k


def ends_mid_sentence(piece: str) -> bool:
    """Whether a piece the cutter sent is a first clause: its sentence goes on in the next piece."""
    return piece.endswith(tuple(_CLAUSE_MARKS))


def _emit(out: list[str], text: str) -> None:
    text = text.strip()
    if text:
        out.append(text)


def _period_goes_on(before: str, first: str) -> bool:
    """Whether a lone period after ``before`` is an abbreviation, not an end.

    ``first`` is the first visible character after the period and its spaces.
    """
    words = before.split()
    if not words:
        return False
    token = words[-1].lstrip(_OPENERS)
    if not token:
        return False
    low = token.lower()
    if token.isdigit() and len(words) == 1:
        return True  # "1. Mix the flour" — a list number opening the line
    if low in _NEVER_END or (token[0].isupper() and low in _TITLES):
        return True
    if first.isdigit() and low in _BEFORE_NUMBER:
        return True
    prev = words[-2].lstrip(_OPENERS) if len(words) > 1 else ""
    if low == "al" and prev.lower() == "et":
        return True  # "Smith et al. (2020)"
    if first.isupper() and _INITIALS.fullmatch(token) and token not in _PLACES:
        if prev.lower() in _LETTER_LABELS:
            return False
        return not prev or prev[0].isupper() or prev.lower() in _NAME_INTRO
    return False


# ---------------------------------------------------------------------------
# speakable text

_FENCED_BLOCK = re.compile(r"```.*?```", re.S)
_FENCE = re.compile(r"```[\w+#.-]*")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+", re.M)
_QUOTE = re.compile(r"^\s*>\s?", re.M)
_BULLET = re.compile(r"^\s*(?:[-*+•‣◦▪]|\d{1,3}[.)])\s+", re.M)
_RULE = re.compile(r"^\s*(?:[-*_=]\s*){3,}$", re.M)
_TABLE_SEP = re.compile(r"^\s*\|?[\s:|-]*-[\s:|-]*\|?\s*$", re.M)
_CODE = re.compile(r"`([^`]*)`")
_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_EM_STAR = re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])")
_EM_UNDER = re.compile(r"(?<![\w_])_(?=\S)(.+?)(?<=\S)_(?![\w_])")
_STRIKE = re.compile(r"~~(.+?)~~")
_EMAIL = re.compile(r"\b([\w.+-]+)@([\w-]+(?:\.[\w-]+)+)\b")
_TLDS = "com|org|net|io|dev|ai|app|edu|gov|co|uk|de|fr|eu|info|me|tv|us|ca|au"
_URL = re.compile(
    r"\b(?:https?://\S+|www\.\S+|[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:" + _TLDS + r")\b(?:/\S*)?)",
    re.I,
)
_FILE_EXTS = (
    "pdf|txt|md|py|js|ts|json|csv|docx?|xlsx?|pptx?|png|jpe?g|gif|svg|mp3|mp4|wav|zip"
    "|html?|css|ya?ml|toml|ini|cfg|log|exe|sh|gguf|onnx"
)
_FILE = re.compile(r"\b([\w-]+(?:\.[\w-]+)*)\.(" + _FILE_EXTS + r")\b", re.I)
_MONEY = re.compile(
    r"([$€£])\s?(\d[\d,]*)(?:\.(\d{1,2}))?(?!\d)"
    r"(\s*(?:thousand|million|billion|trillion)\b)?",
    re.I,
)
_CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
}
_SYMBOLS = [
    (re.compile(r"(\d)\s?%"), r"\1 percent"),
    (re.compile(r"%"), " percent "),
    (re.compile(r"°\s?C\b"), " degrees Celsius"),
    (re.compile(r"°\s?F\b"), " degrees Fahrenheit"),
    (re.compile(r"°"), " degrees"),
    (re.compile(r"\b([CF])#"), r"\1 sharp"),
    (re.compile(r"#(?=\d)"), "number "),
    (re.compile(r"#"), ""),
    (re.compile(r"(\d)\s*[*×]\s*(\d)"), r"\1 times \2"),
    (re.compile(r"(\d)\s*–\s*(\d)"), r"\1 to \2"),
    (re.compile(r"\s*[—–]\s*"), ", "),
    (re.compile(r"->|→|⟶"), " to "),
    (re.compile(r"~(?=\d)|≈"), " about "),
    (re.compile(r"≤|<="), " at most "),
    (re.compile(r"≥|>="), " at least "),
    (re.compile(r"(?<=[\d\s])<(?=[\d\s])"), " less than "),
    (re.compile(r"(?<=[\d\s])>(?=[\d\s])"), " greater than "),
    (re.compile(r"&"), " and "),
    (re.compile(r"\+"), " plus "),
    (re.compile(r"="), " equals "),
    (re.compile(r"@"), " at "),
    (re.compile(r"×"), " times "),
    (re.compile(r"÷"), " divided by "),
    (re.compile(r"[*_~^|\\`<>]"), " "),
]
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?…])")
_SPACES = re.compile(r"\s+")


def speakable(text: str) -> str:
    """What a voice should read for ``text``; "" when nothing speakable is left.

    Markdown (emphasis, headings, bullets and list numbers, quotes, tables, code
    fences and inline code marks) is removed; a complete fenced code block is
    dropped, since code read aloud helps no one. URLs are read as host and path:
    ``https://www.example.com/docs?x=1`` → "example dot com slash docs" (scheme,
    ``www.``, query and fragment dropped; ``-`` and ``_`` in the path become
    spaces). E-mail addresses and file names are read with "at" and "dot".
    Prices read with their unit ("$4.99" → "4 dollars and 99 cents"), common
    symbols become words (& and, % percent, + plus, = equals, ° degrees, …),
    emoji are dropped and whitespace is collapsed.
    """
    text = _FENCED_BLOCK.sub(" ", text)
    text = _FENCE.sub(" ", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _RULE.sub(" ", text)
    text = _TABLE_SEP.sub(" ", text)
    text = _HEADING.sub("", text)
    text = _QUOTE.sub("", text)
    text = _BULLET.sub("", text)
    text = _table_rows(text)
    text = _CODE.sub(r"\1", text)
    for _ in range(2):  # nested emphasis such as ***both***
        text = _STRONG.sub(r"\2", text)
        text = _EM_STAR.sub(r"\1", text)
        text = _EM_UNDER.sub(r"\1", text)
    text = _STRIKE.sub(r"\1", text)
    text = _EMAIL.sub(lambda m: f"{_dotted(m[1])} at {_dotted(m[2])}", text)
    text = _URL.sub(_read_url, text)
    text = _FILE.sub(lambda m: f"{_dotted(m[1])} dot {m[2]}", text)
    text = _MONEY.sub(_read_money, text)
    for pattern, replacement in _SYMBOLS:
        text = pattern.sub(replacement, text)
    text = "".join(ch for ch in text if not _is_emoji(ch))
    text = _SPACES.sub(" ", text).strip()
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = text.lstrip(".,;:!?…) ")
    return text if any(ch.isalnum() for ch in text) else ""


def _table_rows(text: str) -> str:
    """Read a markdown table row "| a | b |" as "a, b"."""
    lines = []
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith("|") and stripped.count("|") >= 2:
            cells = [cell.strip() for cell in stripped.strip("|").split("|")]
            line = ", ".join(cell for cell in cells if cell)
        lines.append(line)
    return "\n".join(lines)


def _dotted(name: str) -> str:
    """Read "john.doe" as "john dot doe"."""
    return " dot ".join(part for part in re.split(r"\.", name) if part)


def _read_url(match: re.Match[str]) -> str:
    url = match[0]
    # Sentence punctuation and markdown closers glued to the URL are not part of it.
    trail = ""
    while url and url[-1] in ".,;:!?)]}\"'*_`":
        trail = url[-1] + trail
        url = url[:-1]
    url = re.sub(r"^https?://", "", url, flags=re.I)
    url = re.sub(r"^www\.", "", url, flags=re.I)
    url = re.split(r"[?#]", url, maxsplit=1)[0]
    host, _, path = url.partition("/")
    host = re.sub(r":\d+$", "", host)
    spoken = [_dotted(host.lower())]
    for segment in path.split("/"):
        segment = re.sub(r"[-_+]+", " ", segment).strip()
        if segment:
            spoken.append(_dotted(segment))
    return " slash ".join(spoken) + trail


def _read_money(match: re.Match[str]) -> str:
    one, many, sub_one, sub_many = _CURRENCIES[match[1]]
    whole, cents, scale = match[2], match[3], match[4]
    if scale:  # "$1.5 million" → "1.5 million dollars"
        amount = whole + (f".{cents}" if cents else "")
        return f"{amount}{scale} {many}"
    words = f"{whole} {one if whole == '1' else many}"
    if cents:
        cents = cents.ljust(2, "0")
        if cents != "00":
            value = int(cents)
            words += f" and {value} {sub_one if value == 1 else sub_many}"
    return words


def _is_emoji(ch: str) -> bool:
    """Pictographs, flags, keycaps and their joiners/modifiers."""
    code = ord(ch)
    if ch in "\u200d\ufe0e\ufe0f\u20e3" or 0x1F3FB <= code <= 0x1F3FF:
        return True
    return unicodedata.category(ch) in ("So", "Cs", "Co")


_CLAUSE_BREAK = re.compile(r"(?<=[,;:—])\s+")


def split_clauses(sentence: str, *, long_words: int = 12, min_words: int = 4) -> list[str]:
    """Cut a long sentence at clause breaks (, ; : —) into pieces of at least ``min_words``.

    The speaker synthesizes a turn's first sentence piece by piece, so a long
    opening sentence starts sounding after its first clause rather than after
    all of it (piper returns a whole input at once). Short sentences stay whole.
    """
    if len(sentence.split()) <= long_words:
        return [sentence]
    pieces: list[str] = []
    for part in _CLAUSE_BREAK.split(sentence):
        if pieces and min(len(part.split()), len(pieces[-1].split())) < min_words:
            pieces[-1] = f"{pieces[-1]} {part}"
        else:
            pieces.append(part)
    return pieces
