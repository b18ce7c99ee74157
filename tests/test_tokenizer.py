from transformers import AutoTokenizer

from flexmoe.tokenizer import BOS, EOS, PAD, train_tokenizer

DOCS = [
    "The little fox ran to the river. It was happy to see the water!",
    "def add(a, b):\n    return a + b\n",
    "Section 4(b): The Licensee shall pay 1,250.00 EUR.  Unicode: café, naïve, 東京 🙂",
] * 30


def test_round_trip_and_special_tokens(tmp_path):
    tok = train_tokenizer(DOCS, vocab_size=400)
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (BOS, EOS, PAD)
    assert len({loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id}) == 3
    for text in DOCS[:3] + ["never seen: Zebra quagga 42\t\n"]:
        ids = loaded(text)["input_ids"]
        assert ids[0] == loaded.bos_token_id  # every sequence starts with BOS
        assert loaded.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless


def test_vocab_size_is_a_setting():
    assert len(train_tokenizer(DOCS, vocab_size=300)) <= 300
    assert len(train_tokenizer(DOCS, vocab_size=500)) > 300
