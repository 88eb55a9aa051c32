"""The streaming sentence cutter and speakable-text cleanup.

Every corpus entry is a realistic model answer with the sentences a listener
should hear, fed whole, one character at a time, in random chunks and as a
model-like token stream; all must agree, and each sentence must come out no
later than the feed() that brings the next sentence's first character.
"""

from __future__ import annotations

import random
import re

import pytest

from voicebus.workers.sentences import SentenceCutter, speakable, split_clauses

CORPUS: list[tuple[str, str, list[str]]] = [
    # plain prose
    ("greeting", "Hello there! How can I help you today?",
     ["Hello there!", "How can I help you today?"]),
    ("facts", "Sure. The capital of France is Paris. It has about two million people.",
     ["Sure.", "The capital of France is Paris.", "It has about two million people."]),
    ("eiffel", "The Eiffel Tower is in Paris, France. It was completed in 1889 and is about "
     "330 meters tall. Millions of people visit it every year.",
     ["The Eiffel Tower is in Paris, France.",
      "It was completed in 1889 and is about 330 meters tall.",
      "Millions of people visit it every year."]),
    ("no-final-mark", "Sure thing", ["Sure thing"]),
    ("number-ends", "The answer is 42. That's the whole story.",
     ["The answer is 42.", "That's the whole story."]),
    ("interrobang", "You did what?! That's amazing!", ["You did what?!", "That's amazing!"]),
    ("many-bangs", "Wow!!! That's incredible.", ["Wow!!!", "That's incredible."]),
    ("short-yes", "Yes.\n", ["Yes."]),
    # decimals, prices, versions
    ("pi", "Pi is roughly 3.14159. That's close enough for most uses.",
     ["Pi is roughly 3.14159.", "That's close enough for most uses."]),
    ("prices", "The coffee costs $4.99. The muffin is $2.50 more.",
     ["The coffee costs $4.99.", "The muffin is $2.50 more."]),
    ("version", "Upgrade to v1.2.3 first. Then restart the server.",
     ["Upgrade to v1.2.3 first.", "Then restart the server."]),
    ("python-version", "This needs Python 3.11 or newer. Version 3.10 won't work.",
     ["This needs Python 3.11 or newer.", "Version 3.10 won't work."]),
    ("version-ends", "The latest release is 2.0.1. It fixes several bugs.",
     ["The latest release is 2.0.1.", "It fixes several bugs."]),
    ("percent", "Sales rose 12.5% last year. Profits doubled.",
     ["Sales rose 12.5% last year.", "Profits doubled."]),
    ("temperature", "It's 21.5 degrees outside. Bring a light jacket.",
     ["It's 21.5 degrees outside.", "Bring a light jacket."]),
    # abbreviations and initials
    ("titles", "Dr. Smith will see you now. Mr. Jones is next.",
     ["Dr. Smith will see you now.", "Mr. Jones is next."]),
    ("more-titles", "Mrs. Brown and Prof. Lee met at St. Mary's church. They talked for hours.",
     ["Mrs. Brown and Prof. Lee met at St. Mary's church.", "They talked for hours."]),
    ("eg", "Bring something warm, e.g. a jacket or a sweater. It gets cold at night.",
     ["Bring something warm, e.g. a jacket or a sweater.", "It gets cold at night."]),
    ("eg-capital", "Pick a big city, e.g. Paris or Rome. Both are lovely.",
     ["Pick a big city, e.g. Paris or Rome.", "Both are lovely."]),
    ("ie", "Use the short form, i.e. the one without the prefix. That saves time.",
     ["Use the short form, i.e. the one without the prefix.", "That saves time."]),
    ("etc-mid", "We need flour, sugar, eggs, etc. to bake the cake. Let's start.",
     ["We need flour, sugar, eggs, etc. to bake the cake.", "Let's start."]),
    ("etc-end", "I packed shirts, socks, etc. Then I left for the airport.",
     ["I packed shirts, socks, etc.", "Then I left for the airport."]),
    ("us-uk", "She moved to the U.S. in 2010. Later she moved to the U.K. She loves it there.",
     ["She moved to the U.S. in 2010.", "Later she moved to the U.K.", "She loves it there."]),
    ("tolkien", "J. R. R. Tolkien wrote The Hobbit. It came out in 1937.",
     ["J. R. R. Tolkien wrote The Hobbit.", "It came out in 1937."]),
    ("rowling", "The Harry Potter books were written by J. K. Rowling. They sold very well.",
     ["The Harry Potter books were written by J. K. Rowling.", "They sold very well."]),
    ("middle-initial", "George W. Bush was the 43rd president. He served two terms.",
     ["George W. Bush was the 43rd president.", "He served two terms."]),
    ("vitamin", "Oranges are rich in vitamin C. They are also tasty.",
     ["Oranges are rich in vitamin C.", "They are also tasty."]),
    ("plan-b", "If that fails, we use Plan B. It always works.",
     ["If that fails, we use Plan B.", "It always works."]),
    ("et-al", "Smith et al. (2020) found the same. The effect was small.",
     ["Smith et al. (2020) found the same.", "The effect was small."]),
    ("am-pm", "The store opens at 9 a.m. tomorrow. It closes at 5 p.m. Don't be late.",
     ["The store opens at 9 a.m. tomorrow.", "It closes at 5 p.m.", "Don't be late."]),
    ("no-answer", "Is it raining? No. It's sunny. See No. 5 on the list.",
     ["Is it raining?", "No.", "It's sunny.", "See No. 5 on the list."]),
    ("figure", "As shown in Fig. 3 the curve rises. It then flattens.",
     ["As shown in Fig. 3 the curve rises.", "It then flattens."]),
    ("versus", "It's Python vs. Rust tonight. Who will win?",
     ["It's Python vs. Rust tonight.", "Who will win?"]),
    # URLs, e-mail addresses, file names
    ("url", "You can find the docs at https://www.example.com/docs/getting-started. "
     "They cover everything.",
     ["You can find the docs at https://www.example.com/docs/getting-started.",
      "They cover everything."]),
    ("bare-url", "Check example.com/a.b for details. It's updated weekly.",
     ["Check example.com/a.b for details.", "It's updated weekly."]),
    ("url-query", "Search at https://example.com/search?q=tea. Results appear instantly.",
     ["Search at https://example.com/search?q=tea.", "Results appear instantly."]),
    ("email", "Email john.doe@mail.com for help. He usually answers within a day.",
     ["Email john.doe@mail.com for help.", "He usually answers within a day."]),
    ("files", "Open report.pdf and read section 2. Then fill in form.docx.",
     ["Open report.pdf and read section 2.", "Then fill in form.docx."]),
    ("config-file", "The settings live in config.yaml. Edit it carefully.",
     ["The settings live in config.yaml.", "Edit it carefully."]),
    ("dotnet", "I recommend .NET for this. It's well supported.",
     ["I recommend .NET for this.", "It's well supported."]),
    # lists, headings, paragraphs, code
    ("numbered", "Here's how to make tea:\n1. Boil the water.\n2. Add the tea bag.\n"
     "3. Wait three minutes.",
     ["Here's how to make tea:", "1. Boil the water.", "2. Add the tea bag.",
      "3. Wait three minutes."]),
    ("numbered-bare", "Steps:\n1. Preheat the oven\n2. Mix the batter\n3. Bake for 20 minutes",
     ["Steps:", "1. Preheat the oven", "2. Mix the batter", "3. Bake for 20 minutes"]),
    ("bullets", "You'll need:\n- Flour\n- Sugar\n* Eggs\n• Butter",
     ["You'll need:", "- Flour", "- Sugar", "* Eggs", "• Butter"]),
    ("paragraphs", "First paragraph ends here.\n\nSecond paragraph starts here. It has two "
     "sentences.",
     ["First paragraph ends here.", "Second paragraph starts here.", "It has two sentences."]),
    ("markdown", "## Summary\n**Key point.** Always back up your data. *Really.*",
     ["## Summary", "**Key point.**", "Always back up your data.", "*Really.*"]),
    ("bold-list", "Top tips:\n1. **Sleep well.** Aim for eight hours.\n2. **Eat well.** "
     "Skip junk food.",
     ["Top tips:", "1. **Sleep well.**", "Aim for eight hours.", "2. **Eat well.**",
      "Skip junk food."]),
    ("code-fence", "Run this:\n```bash\npip install voicebus\n```\nThat's it.",
     ["Run this:", "```bash", "pip install voicebus", "```", "That's it."]),
    ("crlf", "Line one.\r\nLine two.", ["Line one.", "Line two."]),
    # ellipses
    ("ellipsis-capital", "Well... I think so. But I'm not sure.",
     ["Well...", "I think so.", "But I'm not sure."]),
    ("ellipsis-lower", "Hmm... let me think about that. Okay, got it!",
     ["Hmm... let me think about that.", "Okay, got it!"]),
    ("ellipsis-char", "Wait… Actually, never mind.", ["Wait…", "Actually, never mind."]),
    # semicolons, quotes, brackets, emoji
    ("semicolon", "It's late; we should go home. Tomorrow is another day.",
     ["It's late;", "we should go home.", "Tomorrow is another day."]),
    ("quote", 'He said "hi." Then he left.', ['He said "hi."', "Then he left."]),
    ("quote-curly", "She said “no.” Then she walked away.",
     ["She said “no.”", "Then she walked away."]),
    ("quote-single", "She said 'no.' Then she walked away.",
     ["She said 'no.'", "Then she walked away."]),
    ("dialogue", '"Are you coming?" she asked. "Yes!" he replied.',
     ['"Are you coming?" she asked.', '"Yes!" he replied.']),
    ("bracket", "It works on Linux (and macOS, too!) Try it today.",
     ["It works on Linux (and macOS, too!)", "Try it today."]),
    ("emoji-spaced", "Great job! 🎉 Keep going.", ["Great job!", "🎉 Keep going."]),
    ("emoji-glued", "Great job!🎉 Keep going.", ["Great job!🎉", "Keep going."]),
    # CJK and Spanish
    ("chinese", "你好。今天天气很好！我们去公园吧？好的；走吧。",
     ["你好。", "今天天气很好！", "我们去公园吧？", "好的；", "走吧。"]),
    ("japanese", "彼は「こんにちは」と言った。それから帰った。",
     ["彼は「こんにちは」と言った。", "それから帰った。"]),
    ("chinese-quote", "他说：“我们走吧。”然后就走了。",
     ["他说：“我们走吧。”", "然后就走了。"]),
    ("spanish", "¿Qué tal? ¡Bien! Gracias por preguntar.",
     ["¿Qué tal?", "¡Bien!", "Gracias por preguntar."]),
    ("spanish-glued", "¡Hola!¿Cómo estás?", ["¡Hola!", "¿Cómo estás?"]),
]

IDS = [name for name, _, _ in CORPUS]
CASES = [(text, expected) for _, text, expected in CORPUS]


def run(chunks: list[str]) -> list[list[str]]:
    """What each feed() returned, then what flush() returned."""
    cutter = SentenceCutter()
    return [cutter.feed(chunk) for chunk in chunks] + [cutter.flush()]


def flat(results: list[list[str]]) -> list[str]:
    return [sentence for batch in results for sentence in batch]


def random_chunks(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    chunks, i = [], 0
    while i < len(text):
        size = rng.randint(1, 8)
        chunks.append(text[i:i + size])
        i += size
    return chunks


def model_tokens(text: str) -> list[str]:
    """Split like a BPE model stream: words with their leading space, marks alone."""
    tokens = re.findall(r"\s*[\w']+|\s*[^\w\s]|\s+", text)
    assert "".join(tokens) == text
    return tokens


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 40
    assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
def test_whole(text: str, expected: list[str]) -> None:
    assert flat(run([text])) == expected


@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
def test_char_by_char(text: str, expected: list[str]) -> None:
    assert flat(run(list(text))) == expected


@pytest.mark.parametrize("seed", [1, 7, 42, 2024])
@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
def test_random_chunks(text: str, expected: list[str], seed: int) -> None:
    assert flat(run(random_chunks(text, seed))) == expected


@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
def test_model_tokens(text: str, expected: list[str]) -> None:
    assert flat(run(model_tokens(text))) == expected


def emitted_by(chunks: list[str], expected: list[str]) -> None:
    """Assert each sentence leaves no later than the chunk with the next one's start."""
    results = run(chunks)
    call_of = [call for call, batch in enumerate(results) for _ in batch]
    assert flat(results) == expected
    chunk_of_offset = [call for call, chunk in enumerate(chunks) for _ in chunk]
    text = "".join(chunks)
    offset = 0
    starts = []
    for sentence in expected:
        offset = text.index(sentence, offset)
        starts.append(offset)
        offset += len(sentence)
    for i in range(len(expected) - 1):
        deadline = chunk_of_offset[starts[i + 1]]
        assert call_of[i] <= deadline, (
            f"{expected[i]!r} came out at feed #{call_of[i]}, after feed #{deadline} "
            f"brought {expected[i + 1][0]!r}"
        )


@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
def test_timing_char_by_char(text: str, expected: list[str]) -> None:
    emitted_by(list(text), expected)


@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
def test_timing_model_tokens(text: str, expected: list[str]) -> None:
    emitted_by(model_tokens(text), expected)


@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
def test_timing_random_chunks(text: str, expected: list[str]) -> None:
    emitted_by(random_chunks(text, 99), expected)


def test_holds_back_only_while_ambiguous() -> None:
    cutter = SentenceCutter()
    assert cutter.feed("It costs 3.") == []
    assert cutter.feed("5 dollars. I") == ["It costs 3.5 dollars."]
    assert cutter.feed(" met Dr.") == []
    assert cutter.feed(" ") == []
    assert cutter.feed("Smith") == []
    assert cutter.feed(". ") == []
    assert cutter.feed("He") == ["I met Dr. Smith."]
    assert cutter.flush() == ["He"]


def test_certain_ends_go_out_at_once() -> None:
    cutter = SentenceCutter()
    assert cutter.feed("Line one\n") == ["Line one"]
    assert cutter.feed("It is late; ") == ["It is late;"]
    assert cutter.feed("go!\n") == ["go!"]
    assert cutter.feed("好。走") == ["好。"]
    assert cutter.feed("吧") == []
    assert cutter.flush() == ["走吧"]


def test_flush_resets_for_the_next_stream() -> None:
    cutter = SentenceCutter()
    cutter.feed("First answer.")
    assert cutter.flush() == ["First answer."]
    assert cutter.flush() == []
    assert cutter.feed("Second. Third") == ["Second."]
    assert cutter.flush() == ["Third"]


def test_blank_chunks_and_blank_lines_give_nothing() -> None:
    cutter = SentenceCutter()
    assert cutter.feed("") == []
    assert cutter.feed("\n\n  \n") == []
    assert cutter.flush() == []


SPEAKABLE = [
    ("**Bold** and *italic* and _under_ text.", "Bold and italic and under text."),
    ("Run `pip install voicebus` first.", "Run pip install voicebus first."),
    ("## Getting started", "Getting started"),
    ("- Flour", "Flour"),
    ("* Eggs", "Eggs"),
    ("• Butter", "Butter"),
    ("1. Boil the water.", "Boil the water."),
    ("> Quoted wisdom.", "Quoted wisdom."),
    ("```python", ""),
    ("```", ""),
    ("Try this:\n```python\nprint('hi')\n```\nDone.", "Try this: Done."),
    ("---", ""),
    ("🎉", ""),
    ("Great job! 🎉👍🏽", "Great job!"),
    ("Go to https://www.example.com/docs for more.",
     "Go to example dot com slash docs for more."),
    ("See https://example.com/getting-started?utm=x#top.",
     "See example dot com slash getting started."),
    ("Visit example.org today.", "Visit example dot org today."),
    ("Mail john.doe@mail.com now.", "Mail john dot doe at mail dot com now."),
    ("Open report.pdf please.", "Open report dot pdf please."),
    ("[the docs](https://example.com/docs) explain it.", "the docs explain it."),
    ("Salt & pepper.", "Salt and pepper."),
    ("A 50% discount.", "A 50 percent discount."),
    ("It is 21°C outside.", "It is 21 degrees Celsius outside."),
    ("It costs $4.99.", "It costs 4 dollars and 99 cents."),
    ("Just $1 today.", "Just 1 dollar today."),
    ("A $1.5 million deal.", "A 1.5 million dollars deal."),
    ("That is €20.", "That is 20 euros."),
    ("2 + 2 = 4", "2 plus 2 equals 4"),
    ("I love C# and C++.", "I love C sharp and C plus plus."),
    ("Ranked #1 again.", "Ranked number 1 again."),
    ("my_variable_name", "my variable name"),
    ("Pi is 3.14 and v1.2.3 is out.", "Pi is 3.14 and v1.2.3 is out."),
    ("Dr. Smith said hi.", "Dr. Smith said hi."),
    ("| Name | Age |", "Name, Age"),
    ("|------|-----|", ""),
    ("  lots   of \t space\n here ", "lots of space here"),
    ("¿Qué tal?", "¿Qué tal?"),
    ("你好。", "你好。"),
    ("", ""),
    ("...", ""),
    ("~~old~~ new", "old new"),
    ("***Very*** important.", "Very important."),
    ("Wait — really?", "Wait, really?"),
    ("Pages 10–20.", "Pages 10 to 20."),
]


@pytest.mark.parametrize(("text", "expected"), SPEAKABLE, ids=[t for t, _ in SPEAKABLE])
def test_speakable(text: str, expected: str) -> None:
    assert speakable(text) == expected


@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
def test_corpus_sentences_stay_readable(text: str, expected: list[str]) -> None:
    # No sentence the cutter produces keeps markdown marks or raw URL syntax.
    for sentence in expected:
        spoken = speakable(sentence)
        assert not re.search(r"\*\*|`|https?://|^#|^\s*[-•*]\s", spoken), spoken


FUZZ_PIECES = [
    "a", "B", "x", " ", "  ", ".", "!", "?", ";", "\n", '"', ")", "…", "。", "」", "¿", "3",
    "Dr", "e.g", "U.S", "J", " the", "No", "**", "🎉", "\r\n", "https://x.com/a.b",
]


@pytest.mark.parametrize("seed", range(5))
def test_chunking_never_changes_the_result(seed: int) -> None:
    # Random strings of the awkward pieces: however they are split, the cutter
    # agrees with itself and loses no visible character.
    rng = random.Random(seed)
    for _ in range(300):
        text = "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 30)))
        whole = flat(run([text]))
        assert flat(run(list(text))) == whole, text
        assert flat(run(random_chunks(text, rng.randint(0, 10**6)))) == whole, text
        assert "".join("".join(whole).split()) == "".join(text.split()), text


@pytest.mark.parametrize(
    "sentence, pieces",
    [
        ("Short and sweet, really.", ["Short and sweet, really."]),
        (
            "Once upon a time, in a kingdom far away, there lived a brave knight who feared nothing at all.",
            ["Once upon a time,", "in a kingdom far away,", "there lived a brave knight who feared nothing at all."],
        ),
        (
            "Paris is the capital of France; it is known for art, food, and the Eiffel Tower, of course.",
            ["Paris is the capital of France;", "it is known for art, food,", "and the Eiffel Tower, of course."],
        ),
        (
            "There is no break anywhere in this rather long sentence about nothing in particular at all",
            ["There is no break anywhere in this rather long sentence about nothing in particular at all"],
        ),
    ],
)
def test_split_clauses(sentence, pieces):
    assert split_clauses(sentence) == pieces
    assert " ".join(split_clauses(sentence)) == sentence


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("The planet closest to the Sun is Mercury, which orbits it fast. It is small, and hot.",
         ["The planet closest to the Sun is Mercury,", "which orbits it fast.", "It is small, and hot."]),
        ("Yes, it is. Paris, France, is lovely.", ["Yes, it is.", "Paris, France, is lovely."]),  # too short
        ("There are 1,000 meters in a kilometer, give or take none.",
         ["There are 1,000 meters in a kilometer,", "give or take none."]),  # a comma inside a number goes on
        ("A well-known fact — cows drink water: about 30 gallons a day.",
         ["A well-known fact — cows drink water:", "about 30 gallons a day."]),
        ("Milk, eggs, butter and bread.", ["Milk, eggs, butter and bread."]),
    ],
)
def test_the_first_piece_may_be_a_clause(text, pieces):
    for chunks in ([text], list(text), model_tokens(text), random_chunks(text, 5)):
        cutter = SentenceCutter(first_clause_words=4)
        out = [piece for chunk in chunks for piece in cutter.feed(chunk)] + cutter.flush()
        assert out == pieces, chunks
    # each stream starts anew: the next answer's first piece may be a clause again
    cutter = SentenceCutter(first_clause_words=4)
    cutter.feed(text)
    cutter.flush()
    assert (cutter.feed(text) + cutter.flush())[0] == pieces[0]


def test_a_clause_leaves_once_the_character_after_its_comma_is_known():
    cutter = SentenceCutter(first_clause_words=4)
    assert cutter.feed("It is about 1,") == []
    assert cutter.feed("000 meters,") == []
    assert cutter.feed(" o") == ["It is about 1,000 meters,"]
    assert cutter.flush() == ["o"]
