"""The tokenizer of a canonical checkpoint as GGUF vocabulary: SentencePiece (llama) or byte-level BPE (gpt2) token
lists, scores and types, special tokens, and the pre-tokenizer name convert_hf_to_gguf would detect."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path

import gguf

from formats.gguf_types import GGUFExportError

log = logging.getLogger(__name__)


def add_tokenizer(writer, ckpt, vocab_size: int) -> list[str]:
    """The tokenizer.ggml.* keys; returns the token texts written."""
    files = ckpt.tokenizer_files
    if not files:
        log.warning("the checkpoint has no tokenizer files: writing tokenizer.ggml.model 'none'")
        writer.add_tokenizer_model("none")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        spm = "tokenizer.model" in files and not _is_byte_level(files.get("tokenizer.json"))
        spm_json = not spm and _sentencepiece_json(files.get("tokenizer.json"))
        if spm or spm_json:
            tokens, scores, types = [], [], []
            if spm:
                for text, score, typ in gguf.vocab.SentencePieceVocab(tmp_path).all_tokens():
                    tokens.append(text), scores.append(score), types.append(typ)
            else:
                tokens, scores, types = _sentencepiece_json_vocab(spm_json, vocab_size)
                writer.add_add_space_prefix(_adds_space_prefix(spm_json))
            tokens, scores, types = tokens[:vocab_size], scores[:vocab_size], types[:vocab_size]
            for i in range(len(tokens), vocab_size):
                tokens.append(f"[PAD{i}]".encode()), scores.append(-1000.0), types.append(gguf.TokenType.UNUSED)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(tmp_path, load_merges=False, n_vocab=vocab_size)
        else:
            tokens, types, pre = _bpe_vocab(tmp_path, vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(tmp_path, load_merges=True, n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)
    return [t.decode(errors="replace") if isinstance(t, bytes) else t for t in tokens]


# llama.cpp gives the tokens of a file whose general.name contains "phi-3" or "phi3" Phi-3's rstrip attributes,
# looking these up by text (llama-vocab.cpp): a vocabulary without one of them fails to load there
_PHI3_NAME_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def check_name_loads_in_llama_cpp(name: str, tokens: list[str]) -> None:
    """Refuse, in one line, a general.name that makes llama.cpp look for Phi-3 tokens this vocabulary lacks."""
    if not tokens or not any(tag in name.lower() for tag in ("phi-3", "phi3")):
        return
    missing = [t for t in _PHI3_NAME_TOKENS if t not in set(tokens)]
    if missing:
        raise GGUFExportError(f"llama.cpp treats a file named {name!r} as Phi-3 and looks up its tokens "
                              f"{', '.join(missing)}, which this vocabulary lacks (the file would not load): "
                              "pass --name without 'phi3' / 'phi-3'")


def _is_byte_level(tokenizer_json: bytes | None) -> bool:
    return tokenizer_json is not None and b'"ByteLevel"' in tokenizer_json


def _sentencepiece_json(tokenizer_json: bytes | None) -> dict | None:
    """The tokenizer.json of a SentencePiece BPE tokenizer (Llama 2, Mistral, MobileLLM: BPE with byte fallback,
    spaces as U+2581), as transformers 5 saves one loaded from tokenizer.model; None for anything else."""
    if tokenizer_json is None or _is_byte_level(tokenizer_json):
        return None
    parsed = json.loads(tokenizer_json)
    model = parsed.get("model") or {}
    spaces = json.dumps([parsed.get("normalizer"), parsed.get("pre_tokenizer")], ensure_ascii=False)
    if model.get("type") != "BPE" or not model.get("byte_fallback") or "\u2581" not in spaces:
        return None
    return parsed


def _adds_space_prefix(parsed: dict) -> bool:
    """Whether the tokenizer puts U+2581 before the text (SentencePiece's add_dummy_prefix), which llama.cpp's
    tokenizer.ggml.add_space_prefix says: a Metaspace pre-tokenizer that prepends, or a Prepend normalizer (Llama 2,
    Mistral; Gemma's has neither)."""
    steps = []
    for part in (parsed.get("normalizer"), parsed.get("pre_tokenizer")):
        if part:
            steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    def prepends(step: dict) -> bool:
        if step.get("type") == "Prepend":
            return True
        scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
        return step.get("type") == "Metaspace" and scheme in ("always", "first")

    return any(prepends(step) for step in steps)


def _sentencepiece_json_vocab(parsed: dict, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """tokenizer.ggml.model "llama" token list, scores and types from a SentencePiece BPE tokenizer.json.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged token scores highest; tokenizers'
    BPE applies merges by rank. So a token's score is minus the rank of the first merge that makes it (a
    SentencePiece BPE model scores its pieces the same way, by merge order); tokens no merge makes (characters,
    bytes, specials) score below every merged one. Types as SentencePieceVocab gives them: <0xXX> bytes BYTE, the
    unknown token UNKNOWN, special added tokens CONTROL, other added tokens USER_DEFINED."""
    model = parsed["model"]
    vocab: dict[str, int] = model["vocab"]
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                              f"{vocab_size}: tokenizer and model do not match")
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    added = {t["id"]: t for t in parsed.get("added_tokens") or []}
    unmerged = -float(len(rank) + 1)
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores: list[float] = [-1000.0] * vocab_size
    types: list[int] = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text.encode()
        scores[i] = -float(rank[text]) if text in rank else unmerged
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[i] = gguf.TokenType.BYTE
        elif text == model.get("unk_token"):
            types[i] = gguf.TokenType.UNKNOWN
        else:
            types[i] = gguf.TokenType.NORMAL
    for i, token in added.items():
        if i >= vocab_size or types[i] == gguf.TokenType.UNKNOWN:
            continue
        tokens[i], scores[i] = token["content"].encode(), -1000.0
        types[i] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    return tokens, scores, types


def _bpe_vocab(path: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """As convert_hf_to_gguf's get_vocab_base (gpt2 tokenizer model): tokens by id, padded with [PADi]."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never a tokenizer's own code
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                              f"{vocab_size}: tokenizer and model do not match")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if i in decoder and not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = (i in decoder and decoder[i].special) or (token.startswith("<") and token.endswith(">"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, _pretokenizer(tokenizer)


_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL"
)


def _pretokenizer(tokenizer) -> str:
    """tokenizer.ggml.pre as convert_hf_to_gguf detects it: sha256 of the token ids of a fixed text."""
    digest = hashlib.sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    name = _PRETOKENIZER_HASHES.get(digest)
    if name is None:
        log.warning("unknown BPE pre-tokenizer (hash %s...): writing tokenizer.ggml.pre 'default'", digest[:12])
        return "default"
    return name


# convert_hf_to_gguf's tokenizer.ggml.pre detection table (sha256 of the chktxt token ids -> name), copied from
# the vendored llama.cpp of llama-cpp-python 0.3.36 (conversion/base.py, get_vocab_base_pre).
_PRETOKENIZER_HASHES = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "bert-bge",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",
}
