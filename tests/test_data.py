"""opdcore.data (reward, prompt files, rendering, sampler, synthetic task, default setup) and opdcore.sft."""
import json
from pathlib import Path

import pytest
import torch

from opdcore.data import answers_match, extract_answer, normalize_answer, verify


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the machine's cores are shared; tiny models run faster on one thread anyway
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- reward -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    (r"so the result is \boxed{42}.", "42"),
    (r"first \boxed{1} then \boxed{2}", "2"),  # the last box wins
    (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),  # nested braces
    (r"\boxed{\text{a {b} c}} end", r"\text{a {b} c}"),
    (r"\boxed{7} and later a truncated \boxed{12", "7"),  # an unclosed box is skipped
    (r"\fbox{5}", "5"),
    (r"\boxed 9", "9"),
    ("Answer: 612", "612"),
    ("3+9+0=12 2\nAnswer: 612\n", "612"),
    ("answer: 1\nAnswer: 2", "2"),
    ("The answer is 42. Let me double check.", "42"),
    ("the final answer is: 3.5.", "3.5"),
    ("**Answer:** 17", "17"),
    ("#### 6\nAnswer: 5", "5"),  # "Answer:" outranks the GSM8K marker
    ("Answer: 5\n#### 6", "5"),
    ("no marker, just 12", None),
    ("Answer:", None),
    (r"\boxed{}", None),
    ("the answer isn't obvious", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_gsm8k_marker_and_type_error():
    assert extract_answer("Natalia sold 48 clips... #### 72") == "72"
    with pytest.raises(TypeError, match="text must be a str"):
        extract_answer(None)


@pytest.mark.parametrize("raw,expected", [
    ("  $42$ ", "42"), (r"\(x = 5\)", "5"), (r"\text{Paris}", "paris"), (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    ("{1, 2}", "{1,2}"), ("New  York.", "new york"), (r"90^\circ", "90"), ("\u22123", "-3"), (r"\$5", "5"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("pred,gold", [
    ("1,234", "1234"), ("1234", "1,234"), ("1234.0", "1234"), ("1234", 1234), ("1234", 1234.0),
    ("3/4", "0.75"), (r"\frac{3}{4}", "0.75"), (r"\dfrac{3}{4}", "3/4"), (r"\frac34", ".75"),
    (r"-\frac{1}{2}", "-0.5"), (r"\frac{-1}{2}", "-1/2"), ("1e3", "1000"), ("+7", "7"), ("007", "7"),
    ("x = 5", "5"), ("$12$", "12"), (r"\text{Paris}", "paris"), ("(1, 2)", "(1,2)"), ("5", ["4", "5"]),
    ("612", r"\boxed{612}"),
])
def test_answers_match(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("1,2", "12"),  # a pair, not a thousands separator
    ("0.333", "1/3"),  # exact comparison: rounding is not equality
    ("612", "613"), ("-5", "5"), ("50%", "50"), ("1/0", "0"), ("", "0"), (None, "1"), ("1", None),
    ("12", "1 2"), ("paris", "london"), (r"\frac{1}{0}", "1"), ("inf", "inf0"), ("5", ["4", "6"]),
])
def test_answers_do_not_match(pred, gold):
    assert not answers_match(pred, gold)


def test_answers_match_rejects_bad_gold_type():
    with pytest.raises(TypeError, match="gold must be"):
        answers_match("1", True)
    with pytest.raises(TypeError, match="gold must be"):
        answers_match("1", {"a": 1})


def test_verify():
    assert verify("7+5+0=12 2\n1+1+1=3 32\nAnswer: 32", "32") == 1.0
    assert verify(r"The total is \boxed{1,000}.", "1000") == 1.0
    assert verify("Answer: 31", "32") == 0.0
    assert verify("32", "32") == 0.0  # no stated answer, no credit
    with pytest.raises(ValueError, match="no ground-truth answer"):
        verify("Answer: 1", None)


# ---- prompt files -----------------------------------------------------------------------------------------------

from opdcore.data import PromptExample, PromptSampler, filter_long, load_prompts, render_prompt  # noqa: E402

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
ROWS = [
    {"prompt": "1+1=", "answer": "2"},
    {"prompt": CHAT, "reward_model": {"ground_truth": "4", "style": "rule"}, "data_source": "toy"},
    {"prompt": "2+3=", "ground_truth": 5},
    {"prompt": "no answer here"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), path)  # from_pylist keeps the 1st row's keys only
    return path


def _check_rows(examples):
    assert [e.index for e in examples] == [0, 1, 2, 3]
    assert examples[0].prompt == "1+1=" and examples[0].answer == "2"
    assert examples[1].prompt == CHAT and examples[1].answer == "4"
    assert examples[1].row["data_source"] == "toy"
    assert examples[2].answer == "5"  # numbers become strings
    assert examples[3].answer is None


def test_load_prompts_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in ROWS[2:]))
    _check_rows(load_prompts(path))  # blank lines are skipped


def test_load_prompts_json_and_parquet(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    _check_rows(load_prompts(tmp_path / "p.json"))
    # a Parquet column has one type (string prompts here, chat prompts below); missing values read back as null
    out = load_prompts(str(_write_parquet(tmp_path / "p.parquet", [ROWS[0], ROWS[2], ROWS[3]])))
    assert [(e.prompt, e.answer, e.index) for e in out] == [
        ("1+1=", "2", 0), ("2+3=", "5", 1), ("no answer here", None, 2)]


def test_load_prompts_verl_parquet_layout(tmp_path):
    rows = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": f"q{i}"}],
             "reward_model": {"style": "rule", "ground_truth": str(i)}, "extra_info": {"index": i}} for i in range(3)]
    out = load_prompts(_write_parquet(tmp_path / "train.parquet", rows))
    assert [e.answer for e in out] == ["0", "1", "2"]
    assert out[2].prompt == [{"role": "user", "content": "q2"}]


def test_load_prompts_custom_keys(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"q": {"text": "hi"}, "sol": ["1", 2]}])
    ex = load_prompts(path, prompt_key="q.text", answer_key="sol")[0]
    assert ex.prompt == "hi" and ex.answer == ["1", "2"]


@pytest.mark.parametrize("rows,kwargs,match", [
    ([{"prompt": "a"}, {"question": "b"}], {}, r"row 1 \(line 2\): missing prompt key 'prompt'"),
    ([{"prompt": 3}], {}, r"row 0 \(line 1\): 'prompt' must be a string or a list of chat messages, got int"),
    ([{"prompt": ""}], {}, "row 0.*empty string"),
    ([{"prompt": []}], {}, "row 0.*empty list"),
    ([{"prompt": [{"role": "user"}]}], {}, "row 0.*message 0 must be a dict with string 'role' and 'content'"),
    ([{"prompt": "a", "answer": True}], {}, "row 0.*'answer' must be a string.*bool"),
    ([{"prompt": "a", "answer": {"x": 1}}], {}, "row 0.*'answer' must be"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], {"answer_key": "answer"}, "row 1.*missing answer key 'answer'"),
    (["just a string"], {}, "row 0.*must be a JSON object, got str"),
])
def test_load_prompts_row_errors(tmp_path, rows, kwargs, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=match) as info:
        load_prompts(path, **kwargs)
    assert str(path) in str(info.value)


def test_load_prompts_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"unsupported prompt file type '\.csv'"):
        load_prompts(tmp_path / "p.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl row 1 \(line 2\): invalid JSON"):
        load_prompts(bad)
    (tmp_path / "obj.json").write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match="obj.json: a .json prompt file must hold a list"):
        load_prompts(tmp_path / "obj.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: invalid JSON"):
        load_prompts(tmp_path / "broken.json")
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="fake.parquet: cannot read as Parquet"):
        load_prompts(tmp_path / "fake.parquet")
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "\xe9"}\n')
    with pytest.raises(ValueError, match="latin.jsonl: cannot read as UTF-8"):
        load_prompts(tmp_path / "latin.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no prompt rows"):
        load_prompts(tmp_path / "empty.jsonl")


# ---- rendering --------------------------------------------------------------------------------------------------

from opdcore.data import build_char_tokenizer  # noqa: E402

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
    "<nothink>{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def chat_tok(char_tok):
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_render_plain_string(char_tok):
    ids = render_prompt(char_tok, "12+3=")
    assert ids[0] == char_tok.bos_token_id and char_tok.decode(ids[1:]) == "12+3="
    ex = PromptExample(prompt="12+3=", answer="15", index=0, row={})
    assert render_prompt(char_tok, ex) == ids


def test_render_chat_template_and_kwargs(chat_tok):
    ids = render_prompt(chat_tok, CHAT)
    assert ids.count(chat_tok.bos_token_id) == 1  # the template writes BOS; no second one is added
    assert chat_tok.decode(ids) == "<bos><system>Be brief.\n<user>What is 2+2?\n<assistant>"
    off = render_prompt(chat_tok, CHAT, chat_template_kwargs={"enable_thinking": False})
    assert chat_tok.decode(off).endswith("<assistant><nothink>")
    # a plain string prompt becomes one user message when the tokenizer has a template
    assert chat_tok.decode(render_prompt(chat_tok, "hi")) == "<bos><user>hi\n<assistant>"
    # ... unless the template is switched off
    assert chat_tok.decode(render_prompt(chat_tok, "hi", use_chat_template=False)) == "<bos>hi"
    # the same ids as transformers' own tokenize=True path
    assert ids == list(chat_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))


def test_render_errors(char_tok, chat_tok):
    with pytest.raises(ValueError, match="no chat_template"):
        render_prompt(char_tok, CHAT)
    with pytest.raises(ValueError, match="no chat_template"):
        render_prompt(char_tok, "x", use_chat_template=True)
    with pytest.raises(ValueError, match="chat messages need the chat template"):
        render_prompt(chat_tok, CHAT, use_chat_template=False)
    with pytest.raises(ValueError, match="chat_template_kwargs given"):
        render_prompt(char_tok, "x", chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(TypeError, match="prompt must be a string or chat messages"):
        render_prompt(char_tok, 5)


def test_filter_long():
    lists = [[1] * n for n in (3, 10, 5, 11)]
    assert filter_long(lists, 10) == ([0, 1, 2], 1)
    assert filter_long(lists, None) == ([0, 1, 2, 3], 0)
    assert filter_long(lists, 2) == ([], 4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_prompt_tokens must be a positive int"):
            filter_long(lists, bad)


# ---- sampler ----------------------------------------------------------------------------------------------------

def _draw(sampler, steps):
    return [next(sampler) for _ in range(steps)]


@pytest.mark.parametrize("n,gbs,world", [(10, 4, 2), (7, 6, 3), (3, 8, 4), (32, 8, 1)])
def test_sampler_ranks_cover_global_batches(n, gbs, world):
    steps = 9
    ref = PromptSampler(n, gbs, seed=3)
    glob = _draw(ref, steps)
    per_rank = [_draw(PromptSampler(n, gbs, seed=3, rank=r, world_size=world), steps) for r in range(world)]
    for s in range(steps):
        assert sum((per_rank[r][s] for r in range(world)), []) == glob[s]  # disjoint slices, in rank order
        assert all(len(per_rank[r][s]) == gbs // world for r in range(world))
    # every epoch is a permutation: the stream's first n * k entries hold every index k times
    stream = sum(glob, [])
    k = len(stream) // n
    assert sorted(stream[:n * k]) == sorted(list(range(n)) * k)


def test_sampler_deterministic_and_reshuffles():
    a, b = PromptSampler(20, 20, seed=1), PromptSampler(20, 20, seed=1)
    ea, eb = _draw(a, 3), _draw(b, 3)
    assert ea == eb
    assert ea[0] != ea[1]  # a new permutation per epoch
    assert _draw(PromptSampler(20, 20, seed=2), 1)[0] != ea[0]
    assert a.epoch == 3 and a.step == 3


def test_sampler_resume_matches_uninterrupted():
    full = _draw(PromptSampler(13, 4, seed=5, rank=1, world_size=2), 12)
    first = PromptSampler(13, 4, seed=5, rank=1, world_size=2)
    head = _draw(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptSampler(13, 4, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert head + _draw(resumed, 7) == full
    # the position is global: a different world size resumes the same global stream
    glob = _draw(PromptSampler(13, 4, seed=5), 12)
    other = PromptSampler(13, 4, seed=5, rank=0, world_size=4)
    other.load_state_dict(state)
    assert next(other) == glob[5][:1]


def test_sampler_errors():
    with pytest.raises(ValueError, match="global_batch_size=6 must be divisible by world_size=4"):
        PromptSampler(10, 6, world_size=4)
    with pytest.raises(ValueError, match="rank must be < world_size=2"):
        PromptSampler(10, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        PromptSampler(0, 4)
    with pytest.raises(TypeError, match="global_batch_size must be an int"):
        PromptSampler(10, 2.5)
    s = PromptSampler(10, 4, seed=1)
    with pytest.raises(ValueError, match="checkpoint has n=11"):
        s.load_state_dict({**s.state_dict(), "n": 11})
    with pytest.raises(ValueError, match="checkpoint has seed=2"):
        s.load_state_dict({**s.state_dict(), "seed": 2})
    with pytest.raises(ValueError, match="offset=10 out of range"):
        s.load_state_dict({**s.state_dict(), "offset": 10})


# ---- synthetic task ---------------------------------------------------------------------------------------------

import random  # noqa: E402
import re  # noqa: E402

from opdcore.data import addition_procedure, make_addition_problems, parse_procedure_answer, tiny_llama  # noqa: E402
from opdcore.data.synthetic import CHARACTERS, SPECIAL_TOKENS  # noqa: E402

LINE = re.compile(r"^(\d)\+(\d)\+([01])=(\d+) (\d+)$")


def _check_procedure(a, b, text):
    """Every line's arithmetic, carry and running result, then the final answer."""
    *lines, last = text.split("\n")
    assert last == f"Answer: {a + b}"
    da, db = str(a)[::-1], str(b)[::-1]
    assert len(lines) == max(len(da), len(db))
    carry = 0
    for i, line in enumerate(lines):
        x, y, c, s, result = LINE.match(line).groups()
        assert int(x) == (int(da[i]) if i < len(da) else 0) and int(y) == (int(db[i]) if i < len(db) else 0)
        assert int(c) == carry and int(s) == int(x) + int(y) + carry
        carry = int(s) // 10
        assert int(result) == (a + b) % 10 ** (i + 1) or i == len(lines) - 1
        assert result == str(a + b)[-(i + 1):] if i < len(lines) - 1 else result == str(a + b)
    assert parse_procedure_answer(text) == a + b and verify(text, str(a + b)) == 1.0


def test_procedure_is_correct_for_random_problems():
    rng = random.Random(0)
    for _ in range(300):
        digits = rng.randint(1, 6)
        a, b = rng.randrange(10 ** digits), rng.randrange(10 ** rng.randint(1, 6))
        _check_procedure(a, b, addition_procedure(a, b))
    for a, b in ((0, 0), (999, 999), (999, 1), (5, 12345)):
        _check_procedure(a, b, addition_procedure(a, b))
    assert addition_procedure(123, 489) == "3+9+0=12 2\n2+8+1=11 12\n1+4+1=6 612\nAnswer: 612"
    with pytest.raises(ValueError, match="non-negative"):
        addition_procedure(-1, 2)


def test_make_addition_problems():
    probs = make_addition_problems(500, seed=7)
    assert probs == make_addition_problems(500, seed=7) and probs != make_addition_problems(500, seed=8)
    assert len({p["prompt"] for p in probs}) == 500
    for p in probs:
        a, b = map(int, re.fullmatch(r"(\d{3})\+(\d{3})=", p["prompt"]).groups())
        assert p["answer"] == str(a + b) and verify(p["response"], p["answer"]) == 1.0
        _check_procedure(a, b, p["response"])
        assert 40 <= len(p["response"]) <= 70
    more = make_addition_problems(100, seed=7, exclude={p["prompt"] for p in probs})
    assert not {p["prompt"] for p in more} & {p["prompt"] for p in probs}
    assert len(make_addition_problems(100, seed=0, digits=1)) == 100  # the whole 1-digit space
    with pytest.raises(ValueError, match="cannot draw n=101 distinct 1-digit problems"):
        make_addition_problems(101, seed=0, digits=1)


def test_char_tokenizer_round_trip(char_tok, tmp_path):
    from transformers import AutoTokenizer

    assert len(char_tok) == 100 == len(SPECIAL_TOKENS) + len(CHARACTERS)
    assert (char_tok.pad_token_id, char_tok.bos_token_id, char_tok.eos_token_id, char_tok.unk_token_id) == (0, 1, 2, 3)
    assert char_tok.chat_template is None
    text = "".join(CHARACTERS) + "  12+34=\n1+2+0=3 3\nAnswer: 46"
    ids = char_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and char_tok.decode(ids) == text  # one token per character, no separators
    assert char_tok("ab")["input_ids"][0] == char_tok.bos_token_id  # BOS prepended, EOS never appended
    assert char_tok("ab")["input_ids"][-1] != char_tok.eos_token_id
    assert char_tok("\u00e9", add_special_tokens=False)["input_ids"] == [char_tok.unk_token_id]
    out = tmp_path / "tok"
    build_char_tokenizer(out)
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded(text)["input_ids"] == char_tok(text)["input_ids"] and loaded.decode(ids) == text
    assert loaded.eos_token == "<eos>" and loaded.pad_token == "<pad>"


def test_tiny_llama(char_tok):
    m = tiny_llama(len(char_tok), 16, 1, 2, 32, 64, tokenizer=char_tok, seed=0)
    c = m.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
        100, 16, 1, 2, 32)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.max_position_embeddings) == (1, 2, 0, 64)
    assert not c.tie_word_embeddings and not m.training
    again = tiny_llama(len(char_tok), 16, 1, 2, 32, 64, tokenizer=char_tok, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters()))
    tied = tiny_llama(100, 16, 1, 2, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="hidden=10 must be divisible by heads=4"):
        tiny_llama(100, 10, 1, 4)
    with pytest.raises(ValueError, match="vocab_size=50 is smaller than the tokenizer"):
        tiny_llama(50, 16, 1, 2, tokenizer=char_tok)


# ---- SFT --------------------------------------------------------------------------------------------------------

from opdcore import sft  # noqa: E402


def test_sft_labels_cover_response_and_eos_only(char_tok):
    seqs = [sft.encode_sft_example(char_tok, "1+2=", "x"), sft.encode_sft_example(char_tok, "10+20=", "ab")]
    assert seqs[0] == ([1] + char_tok("1+2=", add_special_tokens=False)["input_ids"]
                       + char_tok("x", add_special_tokens=False)["input_ids"] + [2], 5)
    batch = sft._collate(seqs, char_tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0] * 3, [1] * 10]
    labels = batch["labels"].tolist()
    assert labels[0] == [-100] * 5 + seqs[0][0][5:] + [-100] * 3  # the response char and eos
    assert labels[1] == [-100] * 7 + seqs[1][0][7:]


def test_sft_lowers_loss_and_stops_early(char_tok):
    examples = [(p["prompt"], p["response"]) for p in make_addition_problems(64, seed=1, digits=2)]
    model = tiny_llama(len(char_tok), 32, 1, 2, tokenizer=char_tok, seed=0)
    losses = sft.sft_train(model, char_tok, examples, steps=60, batch_size=16, lr=1e-2, warmup=3, seed=0,
                           progress=False)
    assert len(losses) == 60 and not model.training
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    stopped = sft.sft_train(model, char_tok, examples, steps=30, batch_size=4, lr=1e-3, seed=0, progress=False,
                            callback=lambda step, loss: step == 3)
    assert len(stopped) == 3
    with pytest.warns(UserWarning, match="dropped 64 of 64"), pytest.raises(ValueError, match="no training examples"):
        sft.sft_train(model, char_tok, examples, steps=1, batch_size=1, lr=1e-3, max_len=5, progress=False)
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        sft.sft_train(model, char_tok, examples, steps=0, batch_size=1, lr=1e-3, progress=False)


def test_cosine_schedule():
    assert [round(sft.cosine_schedule(s, 10, 2), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_greedy_generate_left_padding_matches_unbatched(char_tok):
    model = tiny_llama(len(char_tok), 32, 2, 2, tokenizer=char_tok, seed=3)
    prompts = ["1+2=", "123+456=", "7=", "99999+1="]
    batched = sft.greedy_generate(model, char_tok, prompts, max_new_tokens=12, batch_size=4)
    single = [sft.greedy_generate(model, char_tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single and all(len(t) > 0 for t in batched)


def test_greedy_accuracy_scores_with_verify(char_tok, monkeypatch):
    monkeypatch.setattr(sft, "greedy_generate", lambda *a, **k: ["Answer: 3", "Answer: 4", "no answer", r"\boxed{7}"])
    assert sft.greedy_accuracy(None, char_tok, ["a", "b", "c", "d"], ["3", "5", "1", 7], max_new_tokens=4) == 0.5
    with pytest.raises(ValueError, match="4 prompts but 3 answers"):
        sft.greedy_accuracy(None, char_tok, ["a", "b", "c", "d"], ["3", "5", "1"], max_new_tokens=4)


# ---- default setup ----------------------------------------------------------------------------------------------

import os  # noqa: E402

from opdcore.presets import DefaultSetup, prepare_default_setup  # noqa: E402

TINY = dict(teacher={"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32},
            student={"hidden": 8, "layers": 1, "heads": 2, "intermediate": 16},
            teacher_sft_steps=3, student_sft_steps=4, student_target_accuracy=None, n_sft=16, n_train=8, n_dev=4,
            n_eval=6, batch_size=4, progress=False)


def test_prepare_default_setup_tiny_and_cached(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    setup = prepare_default_setup(tmp_path, **TINY)
    assert isinstance(setup, DefaultSetup) and not setup.from_cache and setup.student_sft_steps == 4
    assert 0.0 <= setup.teacher_accuracy <= 1.0 and 0.0 <= setup.student_accuracy <= 1.0
    train, evals = load_prompts(setup.train_prompts_path), load_prompts(setup.eval_prompts_path)
    sft_rows = [json.loads(line) for line in Path(setup.sft_data_path).read_text().splitlines()]
    assert (len(train), len(evals), len(sft_rows)) == (8, 6, 16)
    assert all(isinstance(e.prompt, str) and e.answer for e in train + evals)
    sets = [{e.prompt for e in train}, {e.prompt for e in evals}, {r["prompt"] for r in sft_rows}]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])  # disjoint problem sets
    tok = AutoTokenizer.from_pretrained(setup.tokenizer_dir)
    for d, hidden in ((setup.teacher_dir, 16), (setup.student_dir, 8)):
        assert os.path.exists(os.path.join(d, "model.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.config.hidden_size == hidden and model.config.eos_token_id == tok.eos_token_id
        assert AutoTokenizer.from_pretrained(d)("1+2=")["input_ids"] == tok("1+2=")["input_ids"]
    assert setup.max_new_tokens >= max(len(r["response"]) for r in sft_rows) + 1

    again = prepare_default_setup(tmp_path, **TINY)
    assert again.from_cache and again == DefaultSetup(**{**vars(setup), "from_cache": True})
    other = prepare_default_setup(tmp_path, **{**TINY, "seed": 1})  # any setting change is a new cache entry
    assert other.root != setup.root and not other.from_cache
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted(
        [os.path.basename(setup.root), os.path.basename(other.root)])  # no temporary directory left behind


def test_prepare_default_setup_never_uses_a_broken_cache(tmp_path):
    setup = prepare_default_setup(tmp_path, **TINY)
    key = os.path.basename(setup.root)
    # a killed run leaves only a temporary directory: removed by the next build, never read
    os.rename(setup.root, tmp_path / f".{key}.tmp-killed")
    rebuilt = prepare_default_setup(tmp_path, **TINY)
    assert not rebuilt.from_cache and not (tmp_path / f".{key}.tmp-killed").exists()
    # a complete-looking directory without its marker file (or with missing parts) is rebuilt
    os.remove(os.path.join(rebuilt.root, "setup.json"))
    assert not prepare_default_setup(tmp_path, **TINY).from_cache
    import shutil
    shutil.rmtree(rebuilt.student_dir)
    assert not prepare_default_setup(tmp_path, **TINY).from_cache
    assert prepare_default_setup(tmp_path, **TINY).from_cache


def test_prepare_default_setup_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown student setting"):
        prepare_default_setup(tmp_path, **{**TINY, "student": {"width": 3}})
    with pytest.raises(ValueError, match="n_eval must be an int >= 1"):
        prepare_default_setup(tmp_path, **{**TINY, "n_eval": 0})
    with pytest.raises(ValueError, match="student_target_accuracy must be in"):
        prepare_default_setup(tmp_path, **{**TINY, "student_target_accuracy": 1.5})


@pytest.mark.slow
def test_prepare_default_setup_full_size(tmp_path):
    """The real default: teacher near 100%, student clearly weaker (stopped near 20%)."""
    setup = prepare_default_setup(tmp_path, progress=False)
    assert setup.teacher_accuracy >= 0.95
    assert 0.08 <= setup.student_accuracy <= 0.4
    assert setup.build_seconds < 180


def test_a_preset_built_for_the_trainer_is_built_in_a_child_process(tmp_path):
    """isolate=True: a cache miss builds in a spawned child (its memory leaves with it); a hit never spawns."""
    import multiprocessing

    from opdcore.presets.default_setup import NotCached
    from opdcore.presets import prepare_preset

    with pytest.raises(NotCached):
        prepare_default_setup(tmp_path, build=False, **TINY)
    built = prepare_preset("synthetic", tmp_path, isolate=True, **TINY)
    assert not built.from_cache and os.path.isdir(built.student_dir)
    spawned = []
    real = multiprocessing.get_context
    multiprocessing.get_context = lambda *a: spawned.append(a) or real(*a)
    try:
        hit = prepare_preset("synthetic", tmp_path, isolate=True, **TINY)
    finally:
        multiprocessing.get_context = real
    assert hit.from_cache and hit.root == built.root and not spawned
