"""Tests of the papers' metrics (`benchmarks/replication/metrics.py`, `benchmarks/replication/humaneval.py`) against
hand-computed values."""

import gzip
import json
import sys
import time
from pathlib import Path

import pytest
import torch

# The replication scripts import these modules with their folder on `sys.path`; the tests do the same.
REPLICATION = Path(__file__).resolve().parents[1] / "benchmarks" / "replication"
sys.path.insert(0, str(REPLICATION))
try:
    from humaneval import humaneval_infilling_program, pass_at_1, run_program
    from metrics import (
        distinct_n,
        exact_match,
        exact_match_any,
        extract_gsm8k_answer,
        first_word,
        gsm8k_correct,
        lambada_last_word,
        load_jsonl,
        multiple_choice_accuracy,
        multiple_choice_predict,
        normalize_answer,
        rouge_scores,
    )
finally:
    sys.path.remove(str(REPLICATION))

# Offline data and checkpoints live next to the repository (`../shared`), never inside it; tests skip without them.
SHARED = Path(__file__).resolve().parents[2] / "shared"
SINGLE_LINE_INFILLING = SHARED / "data" / "HumanEval-SingleLineInfilling.jsonl.gz"
GSM8K_TEST = SHARED / "data" / "gsm8k_test.jsonl"
LAMBADA_TEST = SHARED / "data" / "lambada_test.jsonl"


# ---------------------------------------------------------------------------------------------------------------------
# Exact match
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  Hello,   World!\n", "hello world"),
        ("an apple a day", "apple day"),
        ("Theory of the Atom", "theory of atom"),  # articles only as whole words
        ("the.", ""),  # punctuation goes first, then the article
        ("Rock 'n' Roll", "rock n roll"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The Beatles.", "beatles", 1.0),
        ("BEATLES", "the beatles", 1.0),
        ("Beatles band", "beatles", 0.0),
        ("beatle", "beatles", 0.0),
        ("New  York", "new york", 1.0),
        ("newyork", "new york", 0.0),  # whitespace collapses, it does not vanish
        ("The", "a", 1.0),  # both normalise to the empty string
        ("", "paris", 0.0),
    ],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


def test_exact_match_any_takes_the_best_alias():
    assert exact_match_any("J.F.K.", ["John F. Kennedy", "JFK"]) == 1.0
    assert exact_match_any("Kennedy", ["John F. Kennedy", "JFK"]) == 0.0
    assert exact_match_any("paris", (alias for alias in ["Paris"])) == 1.0  # any iterable


def test_exact_match_any_rejects_bad_references():
    with pytest.raises(TypeError, match="`references` must be a list of strings"):
        exact_match_any("paris", "paris")
    with pytest.raises(ValueError, match="`references` must hold at least one answer"):
        exact_match_any("paris", [])


# ---------------------------------------------------------------------------------------------------------------------
# LAMBADA
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "context", "target"),
    [
        ("I don't care about signs", "I don't care about", " signs"),
        ("first line\nlast", "first line", "\nlast"),
        ("trailing space  \n", "trailing", " space"),
        ("two  spaces", "two", "  spaces"),  # the context never ends in whitespace
        ('he said "yes"', "he said", ' "yes"'),
    ],
)
def test_lambada_last_word(text, context, target):
    assert lambada_last_word(text) == (context, target)


def test_lambada_last_word_needs_two_words():
    with pytest.raises(ValueError, match="`text` must hold at least two words"):
        lambada_last_word("  lonely ")


@pytest.mark.skipif(not LAMBADA_TEST.exists(), reason="../shared/data/lambada_test.jsonl is absent")
def test_lambada_last_word_reassembles_real_passages():
    records = load_jsonl(LAMBADA_TEST)[:20]
    for record in records:
        context, target = lambada_last_word(record["text"])
        assert context + target == record["text"].rstrip()
        assert target.startswith(" ") and len(target.split()) == 1
    assert lambada_last_word(records[0]["text"])[1] == " signs"


@pytest.mark.parametrize(
    ("generation", "expected"),
    [(" signs. And then", "signs."), ("signs", "signs"), ("\n  word\tnext", "word"), ("   ", ""), ("", "")],
)
def test_first_word(generation, expected):
    assert first_word(generation) == expected


def test_first_word_then_exact_match_scores_lambada():
    _, target = lambada_last_word("I don't care about signs")
    assert exact_match(first_word(" signs, he said."), target) == 1.0
    assert exact_match(first_word(" sign of it"), target) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("#### $5", "5"),
        ("####-7", "-7"),
        ("#### 3.0", "3"),
        ("#### 2.50", "2.5"),
        ("#### 18\n\nQuestion: next one\nAnswer: #### 99", "18"),  # the first `####` counts
        ("So the answer is 42.", "42"),  # no marker: the last number
        ("It costs $1,250.00 in total.", "1250"),
        ("5 apples and 7 pears make 12", "12"),
        ("3 then 4 ####", "4"),  # nothing numeric after the marker: the last number
        ("half is .5", "0.5"),
        ("-0.0", "0"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_correct():
    reference = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
    assert gsm8k_correct("9 eggs at $2 each: $18.00", reference)
    assert gsm8k_correct("The answer is\n#### 18", "18")
    assert not gsm8k_correct("#### 17", reference)
    assert not gsm8k_correct("I cannot tell", reference)
    assert gsm8k_correct("#### 1,000", "1000.0")


def test_gsm8k_correct_needs_a_numeric_reference():
    with pytest.raises(ValueError, match="`reference_answer` must contain a number"):
        gsm8k_correct("#### 1", "none")


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="../shared/data/gsm8k_test.jsonl is absent")
def test_extract_gsm8k_answer_on_real_references():
    for record in load_jsonl(GSM8K_TEST)[:100]:
        written = record["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_gsm8k_answer(record["answer"]) == str(int(written))
        assert gsm8k_correct(record["answer"], record["answer"])


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------------------


def test_multiple_choice_predict_normalises_by_length():
    # Totals 3.0, 4.0, 9.0 over 1, 4, 3 tokens: Score(c) = 3.0, 1.0, 3.0. The raw minimum (choice 0) loses.
    nlls, lengths = [3.0, 4.0, 9.0], [1, 4, 3]
    assert min(range(3), key=lambda index: nlls[index]) == 0
    assert multiple_choice_predict(nlls, lengths) == 1
    assert multiple_choice_predict(torch.tensor(nlls), torch.tensor(lengths)) == 1


def test_multiple_choice_predict_breaks_ties_by_first_index():
    assert multiple_choice_predict([2.0, 4.0, 1.0], [2, 4, 2]) == 2  # Score = 1.0, 1.0, 0.5
    assert multiple_choice_predict([2.0, 4.0, 3.0], [2, 4, 2]) == 0  # Score = 1.0, 1.0, 1.5 -> first of the tie


@pytest.mark.parametrize(
    ("nlls", "lengths", "match"),
    [
        ([], [], "`choice_nlls` must hold at least one choice"),
        ([1.0, 2.0], [1], "one entry per choice, got 2 NLLs and 1 lengths"),
        ([1.0, 2.0], [1, 0], "`choice_lengths` must be positive"),
    ],
)
def test_multiple_choice_predict_validates(nlls, lengths, match):
    with pytest.raises(ValueError, match=match):
        multiple_choice_predict(nlls, lengths)


def test_multiple_choice_accuracy():
    examples = [
        ([3.0, 4.0], [1, 4], 1),  # predicts 1: right
        ([3.0, 4.0], [1, 4], 0),  # predicts 1: wrong
        ([1.0, 5.0, 0.5], [1, 1, 1], 2),  # predicts 2: right
        (torch.tensor([2.0, 2.0]), torch.tensor([1, 2]), 1),  # predicts 1: right
    ]
    assert multiple_choice_accuracy(examples) == 0.75
    with pytest.raises(ValueError, match="`examples` must hold at least one question"):
        multiple_choice_accuracy([])


# ---------------------------------------------------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------------------------------------------------


def test_rouge_scores_hand_computed():
    pytest.importorskip("rouge_score")
    # Pair 1: unigrams P = 3/3, R = 3/4 -> F = 6/7; bigrams P = 2/2, R = 2/3 -> F = 4/5; LCS = 3 -> F = 6/7.
    # Pair 2: no overlap -> 0 everywhere.
    scores = rouge_scores(["The cat sat", "dog"], ["the cat sat down", "cat"])
    assert scores.keys() == {"rouge1", "rouge2", "rougeL"}
    assert scores["rouge1"] == pytest.approx((6 / 7) / 2)
    assert scores["rouge2"] == pytest.approx(0.8 / 2)
    assert scores["rougeL"] == pytest.approx((6 / 7) / 2)


def test_rouge_l_uses_the_longest_common_subsequence():
    pytest.importorskip("rouge_score")
    # "a b c d" vs "a c b d": same unigrams, no shared bigram, LCS = 3 ("a b d") -> P = R = F = 3/4.
    scores = rouge_scores(["a b c d"], ["a c b d"])
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rouge2"] == pytest.approx(0.0)
    assert scores["rougeL"] == pytest.approx(0.75)


def test_rouge_scores_stemming():
    pytest.importorskip("rouge_score")
    assert rouge_scores(["walked"], ["walking"])["rouge1"] == 0.0
    assert rouge_scores(["walked"], ["walking"], use_stemmer=True)["rouge1"] == 1.0


def test_rouge_scores_validates():
    pytest.importorskip("rouge_score")
    with pytest.raises(ValueError, match="must have the same length, got 2 and 1"):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="`predictions` must hold at least one span"):
        rouge_scores([], [])
    with pytest.raises(TypeError, match="must be lists of strings"):
        rouge_scores("a", "a")


def test_rouge_scores_without_rouge_score_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # makes `import rouge_score` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "peft-diffusion\[eval\]"'):
        rouge_scores(["a"], ["a"])


# ---------------------------------------------------------------------------------------------------------------------
# Distinct-n
# ---------------------------------------------------------------------------------------------------------------------


def test_distinct_2_hand_computed():
    # Bigrams: (a b) (b a) (a b) | (a b) (b c) -> 3 unique of 5; none spans the two texts.
    assert distinct_n(["a b a b", "a b c"]) == pytest.approx(3 / 5)
    assert distinct_n(["x y", "x y"]) == pytest.approx(1 / 2)  # a repeated sample lowers the score
    assert distinct_n(["b a", "b"]) == 1.0  # "a b" across the boundary would add (a b)


def test_distinct_n_other_orders_and_tokenizers():
    assert distinct_n(["a b a b", "a b c"], n=1) == pytest.approx(3 / 7)
    assert distinct_n(["a a a a"], n=3) == pytest.approx(1 / 2)
    assert distinct_n(["abab"], n=2, tokenize=list) == pytest.approx(2 / 3)


def test_distinct_n_without_ngrams_is_zero():
    assert distinct_n([]) == 0.0
    assert distinct_n(["single", ""]) == 0.0


def test_distinct_n_validates():
    with pytest.raises(TypeError, match="`texts` must be a list of strings"):
        distinct_n("a b c")
    with pytest.raises(ValueError, match="`n` must be a positive n-gram order, got n=0"):
        distinct_n(["a b"], n=0)


# ---------------------------------------------------------------------------------------------------------------------
# Code execution and pass@1
# ---------------------------------------------------------------------------------------------------------------------

TOY_PROBLEM = {
    "task_id": "toy/0",
    "prompt": "def add(a, b):\n    total = 0\n",
    "suffix": "    return total\n",
    "canonical_solution": "    total = a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    "entry_point": "add",
}


def test_run_program_exit_status():
    assert run_program("import sys\nassert sys.flags.isolated == 1\n", timeout=2.0)  # runs with `-I`
    assert not run_program("assert 1 + 1 == 3\n", timeout=2.0)
    assert not run_program("def broken(:\n", timeout=2.0)
    assert not run_program("raise SystemExit(3)\n", timeout=2.0)


def test_run_program_works_in_a_throwaway_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_program("open('left_behind.txt', 'w').write('x')\n", timeout=2.0)
    assert list(tmp_path.iterdir()) == []


def test_pass_at_1_counts_passes_and_stops_infinite_loops():
    programs = ["assert sum([1, 2]) == 3\n", "assert sum([1, 2]) == 4\n", "while True:\n    pass\n"]
    start = time.monotonic()
    rate, passed = pass_at_1(programs, timeout=2.0)
    assert time.monotonic() - start < 2.0 + 3.0  # the loop is killed at its timeout, not waited for
    assert passed == [True, False, False]
    assert rate == pytest.approx(1 / 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_run_program_kills_what_the_program_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    program = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "child.wait()\n"
    )
    assert not run_program(program, timeout=1.0)
    child_status = Path(f"/proc/{pid_file.read_text()}/status")
    deadline = time.monotonic() + 1.0
    while child_status.exists() and "State:\tZ" not in child_status.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not child_status.exists() or "State:\tZ" in child_status.read_text()  # gone, or dead awaiting reaping


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_timeouts_must_be_positive(timeout):
    with pytest.raises(ValueError, match=f"`timeout` must be a positive number of seconds, got timeout={timeout}"):
        run_program("pass", timeout=timeout)
    with pytest.raises(ValueError, match="`timeout` must be a positive number of seconds"):
        pass_at_1(["pass"], timeout=timeout)


def test_pass_at_1_validates_programs():
    with pytest.raises(ValueError, match="`programs` must hold at least one program"):
        pass_at_1([])
    with pytest.raises(TypeError, match="`programs` must be a list of programs"):
        pass_at_1("pass")


def test_humaneval_infilling_program_layout():
    program = humaneval_infilling_program(TOY_PROBLEM, "    total = a + b\n")
    assert program == (
        "def add(a, b):\n    total = 0\n    total = a + b\n    return total\n"
        "\ndef check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n"
    )
    rate, passed = pass_at_1(
        [
            humaneval_infilling_program(TOY_PROBLEM, TOY_PROBLEM["canonical_solution"]),
            humaneval_infilling_program(TOY_PROBLEM, "    total = a - b\n"),
        ],
        timeout=2.0,
    )
    assert passed == [True, False] and rate == 0.5


def test_humaneval_infilling_program_needs_the_record_keys():
    problem = {key: value for key, value in TOY_PROBLEM.items() if key != "entry_point"}
    with pytest.raises(ValueError, match=r"missing \['entry_point'\]"):
        humaneval_infilling_program(problem, "")


@pytest.mark.skipif(not SINGLE_LINE_INFILLING.exists(), reason="../shared/data HumanEval infilling file is absent")
def test_canonical_solutions_of_real_infilling_records_pass():
    problems = load_jsonl(SINGLE_LINE_INFILLING)[:3]
    programs = [humaneval_infilling_program(problem, problem["canonical_solution"]) for problem in problems]
    programs.append(humaneval_infilling_program(problems[0], "    pass\n"))  # a wrong middle
    rate, passed = pass_at_1(programs, timeout=2.0)
    assert passed == [True, True, True, False]
    assert rate == 0.75


# ---------------------------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------------------------


def test_load_jsonl_reads_plain_and_gzip(tmp_path):
    records = [{"task_id": "a", "n": 1}, {"task_id": "b", "text": "é"}]
    body = "\n".join(json.dumps(record, ensure_ascii=False) for record in records) + "\n\n"
    (tmp_path / "plain.jsonl").write_text(body, encoding="utf-8")
    with gzip.open(tmp_path / "packed.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(body)
    assert load_jsonl(tmp_path / "plain.jsonl") == records
    assert load_jsonl(str(tmp_path / "packed.jsonl.gz")) == records
