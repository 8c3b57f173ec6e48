//! Row keys: a blake3 hash over a canonical, versioned encoding of everything that can
//! change a row's output. Never over YAML text: reordering keys or editing comments leaves
//! every key as it was.
//!
//! A key is built from six component digests (model, prompt, method, sampler, seed,
//! engine) so that `plan --explain` can say which component changed.

use std::fmt;

use crate::prompt::Messages;
use crate::spec::{MethodSpec, SamplerPoint};

/// Bump when the encoding below changes meaning: every old key then misses.
/// 2: the prompt component records the messages' fixed part.
pub const KEY_SCHEMA: u64 = 2;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    /// The digest spelled by 64 hex digits (either case); `None` for anything else. A cache
    /// of a million rows decodes a million keys when it opens, hence no general decoder.
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
            *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Self(out))
    }
}

/// A map keyed by digests. A digest is already uniformly distributed, so its first bytes
/// serve as the hash: SipHash over 32 bytes would cost more than the lookup it serves.
pub type DigestMap<V> = std::collections::HashMap<Digest, V, DigestHash>;

/// The [`std::hash::BuildHasher`] of [`DigestMap`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DigestHash;

impl std::hash::BuildHasher for DigestHash {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

/// Folds what it is given eight bytes at a time; for a digest that is its length prefix
/// and its first eight bytes (the rest adds nothing a uniform hash needs).
#[derive(Debug, Clone, Copy)]
pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(17) ^ u64::from_le_bytes(word);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Length-prefixed, tagged fields: no two different inputs share an encoding.
pub struct KeyEncoder(blake3::Hasher);

impl KeyEncoder {
    pub fn new(domain: &str) -> Self {
        let mut e = Self(blake3::Hasher::new());
        e.bytes("domain", domain.as_bytes());
        e.u64("schema", KEY_SCHEMA);
        e
    }

    pub fn bytes(&mut self, tag: &str, v: &[u8]) -> &mut Self {
        self.0.update(&(tag.len() as u64).to_le_bytes());
        self.0.update(tag.as_bytes());
        self.0.update(&(v.len() as u64).to_le_bytes());
        self.0.update(v);
        self
    }

    pub fn str(&mut self, tag: &str, v: &str) -> &mut Self {
        self.bytes(tag, v.as_bytes())
    }

    pub fn u64(&mut self, tag: &str, v: u64) -> &mut Self {
        self.bytes(tag, &v.to_le_bytes())
    }

    pub fn i64(&mut self, tag: &str, v: i64) -> &mut Self {
        self.bytes(tag, &v.to_le_bytes())
    }

    /// Floats by bit pattern, with -0.0 folded into 0.0.
    pub fn f64(&mut self, tag: &str, v: f64) -> &mut Self {
        let v = if v == 0.0 { 0.0 } else { v };
        self.bytes(tag, &v.to_bits().to_le_bytes())
    }

    pub fn opt_str(&mut self, tag: &str, v: Option<&str>) -> &mut Self {
        match v {
            Some(s) => self.u64(tag, 1).str(tag, s),
            None => self.u64(tag, 0),
        }
    }

    pub fn strs(&mut self, tag: &str, v: &[String]) -> &mut Self {
        self.u64(tag, v.len() as u64);
        for s in v {
            self.str(tag, s);
        }
        self
    }

    pub fn digest(&mut self, tag: &str, d: &Digest) -> &mut Self {
        self.bytes(tag, &d.0)
    }

    pub fn finish(&self) -> Digest {
        Digest(*self.0.finalize().as_bytes())
    }
}

/// Something that contributes to a cache key through an explicit, canonical encoding.
pub trait CacheKey {
    /// Separates the digests of different kinds of things.
    const DOMAIN: &'static str;
    fn encode(&self, e: &mut KeyEncoder);
    fn digest(&self) -> Digest {
        let mut e = KeyEncoder::new(Self::DOMAIN);
        self.encode(&mut e);
        e.finish()
    }
}

/// The model file, by content.
pub struct ModelPart<'a> {
    pub sha256: &'a str,
}

impl CacheKey for ModelPart<'_> {
    const DOMAIN: &'static str = "model";
    fn encode(&self, e: &mut KeyEncoder) {
        e.str("sha256", self.sha256);
    }
}

/// The rendered messages (with the full text), the part of them every row of the prompt
/// shares (it decides which earlier evaluation the row may reuse), and the budget that may
/// truncate the text.
pub struct PromptPart<'a> {
    pub messages: &'a Messages,
    pub budget: Option<crate::spec::TextBudget>,
    /// The row's own choices (per-row choices only): what its log-likelihood scores, whether
    /// or not the prompt shows them.
    pub choices: &'a [String],
}

impl CacheKey for PromptPart<'_> {
    const DOMAIN: &'static str = "prompt";
    fn encode(&self, e: &mut KeyEncoder) {
        e.opt_str("system", self.messages.system.as_deref())
            .str("user", &self.messages.user)
            .u64("fixed_system", self.messages.fixed.system as u64)
            .u64("fixed_user", self.messages.fixed.user as u64)
            .u64(
                "max_text_tokens",
                self.budget.map_or(0, |b| u64::from(b.tokens())),
            );
        // A text's tail is kept since this field was added; a head-only budget keeps the
        // keys it had.
        if let Some(b) = self.budget.filter(|b| b.tail > 0) {
            e.u64("text_tail", u64::from(b.tail));
        }
        // Messages that may spell a chat marker are tokenized as data since this field was
        // added (before, a marker in a text became a control token): their rows get new
        // keys, so no row computed the old way is served. Every other key is unchanged.
        let texts = self.messages.system.iter().chain([&self.messages.user]);
        if texts.into_iter().any(|t| may_spell_a_chat_marker(t)) {
            e.u64("texts_as_data", 1);
        }
        // Fixed labels add nothing, so their keys are as before.
        if !self.choices.is_empty() {
            e.strs("choices", self.choices);
        }
    }
}

/// Whether `text` holds something that looks like a chat marker of a common template
/// (`<|im_end|>`, `</s>`, `[INST]`, `<end_of_turn>`, ...): a superset of what any model's
/// vocabulary calls a control token, found without a tokenizer.
pub fn may_spell_a_chat_marker(text: &str) -> bool {
    const SIGNS: [&str; 14] = [
        "<|",
        "|>",
        "<｜",
        "｜>",
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "<<SYS>>",
        "_of_turn>",
        "<bos>",
        "<eos>",
        "<unk>",
        "<pad>",
    ];
    SIGNS.iter().any(|s| text.contains(s))
}

/// What is asked of the model. Generation: length and stop strings (answer parsing happens
/// later, from the cached raw text, so it is not part of the key). Log-likelihood: the label
/// continuations scored.
pub struct MethodPart<'a> {
    pub method: &'a MethodSpec,
    pub labels: &'a [String],
}

impl CacheKey for MethodPart<'_> {
    const DOMAIN: &'static str = "method";
    fn encode(&self, e: &mut KeyEncoder) {
        use crate::spec::Method;
        match &self.method.method {
            Method::Generate(g) => {
                e.str("kind", "generate")
                    .u64("max_tokens", u64::from(g.max_tokens))
                    .strs("stop", &g.stop);
            }
            // Calibration is not part of the key: it only reweighs the cached scores.
            Method::Loglik { .. } => {
                e.str("kind", "loglik").strs("labels", self.labels);
            }
            Method::KnnVote(_) => {
                e.str("kind", "knn_vote").strs("labels", self.labels);
            }
            // The features a probe reads; what it is fitted on only reweighs them, and the
            // labels do not change a hidden state.
            Method::Probe(p) => match &p.features {
                crate::spec::ProbeFeatures::Hidden { layers, pools } => {
                    let layers: Vec<String> = layers.iter().map(ToString::to_string).collect();
                    let pools: Vec<String> = pools.iter().map(|p| p.as_str().to_string()).collect();
                    e.str("kind", "hidden")
                        .strs("layers", &layers)
                        .strs("pools", &pools);
                }
                crate::spec::ProbeFeatures::Embedder(_) => {
                    e.str("kind", "probe_embedder").strs("labels", self.labels);
                }
            },
        }
    }
}

/// Sampler settings. Greedy decoding (temperature 0) ignores the other settings, so they
/// are left out and greedy cells that differ only there share rows.
pub struct SamplerPart<'a> {
    pub point: Option<&'a SamplerPoint>,
}

impl CacheKey for SamplerPart<'_> {
    const DOMAIN: &'static str = "sampler";
    fn encode(&self, e: &mut KeyEncoder) {
        match self.point {
            None => {
                e.str("sampler", "none");
            }
            Some(p) if p.temperature == 0.0 => {
                e.str("sampler", "greedy");
            }
            Some(p) => {
                e.str("sampler", "chain")
                    .f64("temperature", p.temperature)
                    .f64("top_p", p.top_p)
                    .i64("top_k", i64::from(p.top_k))
                    .f64("min_p", p.min_p);
            }
        }
    }
}

/// Seed and repeat index; irrelevant (and left out) for greedy and log-likelihood.
pub struct SeedPart<'a> {
    pub point: Option<&'a SamplerPoint>,
}

impl CacheKey for SeedPart<'_> {
    const DOMAIN: &'static str = "seed";
    fn encode(&self, e: &mut KeyEncoder) {
        match self.point {
            Some(p) if p.temperature > 0.0 => {
                // "draws": each row's draw is seeded with its prompt too (`Task::for_row`);
                // rows seeded by the grid point alone were keyed without it.
                e.u64("seed", p.seed)
                    .u64("repeat", u64::from(p.repeat))
                    .str("draws", "per row");
            }
            _ => {
                e.str("seed", "none");
            }
        }
    }
}

/// The inference engine and the decoding algorithm around it.
pub struct EnginePart<'a> {
    pub version: &'a str,
}

impl CacheKey for EnginePart<'_> {
    const DOMAIN: &'static str = "engine";
    fn encode(&self, e: &mut KeyEncoder) {
        e.str("version", self.version);
    }
}

/// One text's embedding: the embedder file, its token budget, the exact text, the engine.
pub struct EmbeddingPart<'a> {
    pub sha256: &'a str,
    pub max_tokens: u32,
    pub text: &'a str,
    pub engine: &'a str,
}

impl CacheKey for EmbeddingPart<'_> {
    const DOMAIN: &'static str = "embedding";
    fn encode(&self, e: &mut KeyEncoder) {
        e.str("sha256", self.sha256)
            .u64("max_tokens", self.max_tokens.into())
            .str("text", self.text)
            .str("engine", self.engine);
    }
}

/// A retrieval pool: each row's id, label and embedding key, in order.
pub struct PoolPart<'a> {
    pub rows: &'a [(&'a str, usize, Digest)],
}

impl CacheKey for PoolPart<'_> {
    const DOMAIN: &'static str = "pool";
    fn encode(&self, e: &mut KeyEncoder) {
        e.u64("rows", self.rows.len() as u64);
        for (id, label, emb) in self.rows {
            e.str("id", id)
                .u64("label", *label as u64)
                .digest("embedding", emb);
        }
    }
}

/// One query's neighbours: the pool, the query (its id, for the leak guard, and its
/// embedding key), and how many are chosen and in which order.
pub struct NeighboursPart<'a> {
    pub pool: &'a Digest,
    pub query_id: &'a str,
    pub query: &'a Digest,
    pub k: usize,
    pub per_label: bool,
    pub nearest_last: bool,
}

impl CacheKey for NeighboursPart<'_> {
    const DOMAIN: &'static str = "neighbours";
    fn encode(&self, e: &mut KeyEncoder) {
        e.digest("pool", self.pool)
            .str("query_id", self.query_id)
            .digest("query", self.query)
            .u64("k", self.k as u64)
            .u64("per_label", u64::from(self.per_label))
            .u64("nearest_last", u64::from(self.nearest_last));
    }
}

/// A calibration fit: its kind, the inference rows (with gold labels) it is fitted on, and
/// which of them it leaves out because they failed. A row's key names its inputs, not
/// whether its last attempt failed: a fit made while a row had failed differs from the fit
/// once that row is computed, so the rows left out are part of the key (a fit stored by a
/// version before them has another key, and is made again).
pub struct CalibrationPart<'a> {
    pub kind: &'a str,
    pub rows: &'a [(Digest, Option<usize>)],
    /// Indices into `rows` of the rows left out.
    pub left_out: &'a [usize],
}

impl CacheKey for CalibrationPart<'_> {
    const DOMAIN: &'static str = "calibration";
    fn encode(&self, e: &mut KeyEncoder) {
        e.str("kind", self.kind).u64("rows", self.rows.len() as u64);
        for (k, gold) in self.rows {
            e.digest("row", k)
                .u64("gold", gold.map_or(u64::MAX, |g| g as u64));
        }
        e.u64("left_out", self.left_out.len() as u64);
        for i in self.left_out {
            e.u64("row_left_out", *i as u64);
        }
    }
}

/// The component digests of one row; the row key is their digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Components {
    pub model: Digest,
    pub prompt: Digest,
    pub method: Digest,
    pub sampler: Digest,
    pub seed: Digest,
    pub engine: Digest,
}

impl Components {
    pub const NAMES: [&'static str; 6] = ["model", "prompt", "method", "sampler", "seed", "engine"];

    pub fn parts(&self) -> [Digest; 6] {
        [
            self.model,
            self.prompt,
            self.method,
            self.sampler,
            self.seed,
            self.engine,
        ]
    }

    pub fn from_parts(p: [Digest; 6]) -> Self {
        Self {
            model: p[0],
            prompt: p[1],
            method: p[2],
            sampler: p[3],
            seed: p[4],
            engine: p[5],
        }
    }

    pub fn row_key(&self) -> Digest {
        let mut e = KeyEncoder::new("row");
        for (name, d) in Self::NAMES.iter().zip(self.parts()) {
            e.digest(name, &d);
        }
        e.finish()
    }

    /// Names of the components that differ from `other`.
    pub fn differing(&self, other: &Components) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .zip(self.parts().iter().zip(other.parts()))
            .filter(|(_, (a, b))| *a != b)
            .map(|(n, _)| *n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_what_is_not_a_digest() {
        let d = KeyEncoder::new("t").u64("n", 7).finish();
        assert_eq!(Digest::from_hex(&d.hex()), Some(d));
        assert_eq!(Digest::from_hex(&d.hex().to_uppercase()), Some(d));
        for bad in [
            &d.hex()[1..],
            &format!("{}0", d.hex()),
            &d.hex().replacen('a', "g", 1),
            "",
            "é",
        ] {
            if bad != d.hex() {
                assert_eq!(Digest::from_hex(bad), None, "{bad}");
            }
        }
    }

    fn point(t: f64, seed: u64) -> SamplerPoint {
        SamplerPoint {
            temperature: t,
            top_p: 0.9,
            top_k: 40,
            min_p: 0.05,
            seed,
            repeat: 0,
        }
    }

    #[test]
    fn encoding_is_unambiguous() {
        let a = KeyEncoder::new("x").str("a", "bc").str("b", "").finish();
        let b = KeyEncoder::new("x").str("a", "b").str("b", "c").finish();
        assert_ne!(a, b);
    }

    #[test]
    fn temperature_changes_sampler_only() {
        let p1 = point(0.2, 1);
        let p2 = point(0.8, 1);
        assert_ne!(
            SamplerPart { point: Some(&p1) }.digest(),
            SamplerPart { point: Some(&p2) }.digest()
        );
        assert_eq!(
            SeedPart { point: Some(&p1) }.digest(),
            SeedPart { point: Some(&p2) }.digest()
        );
    }

    #[test]
    fn greedy_ignores_seed_and_other_settings() {
        let a = point(0.0, 1);
        let mut b = point(0.0, 2);
        b.top_p = 0.5;
        assert_eq!(
            SamplerPart { point: Some(&a) }.digest(),
            SamplerPart { point: Some(&b) }.digest()
        );
        assert_eq!(
            SeedPart { point: Some(&a) }.digest(),
            SeedPart { point: Some(&b) }.digest()
        );
    }

    #[test]
    fn differing_names_components() {
        let d = |s: &str| KeyEncoder::new(s).finish();
        let a = Components::from_parts([d("1"), d("2"), d("3"), d("4"), d("5"), d("6")]);
        let mut b = a;
        b.prompt = d("x");
        assert_eq!(a.differing(&b), vec!["prompt"]);
        assert_ne!(a.row_key(), b.row_key());
    }

    /// Rows whose messages may spell a chat marker were tokenized another way before texts
    /// were data: they get keys of their own; every other prompt keeps its key.
    #[test]
    fn only_messages_that_may_spell_a_marker_change_their_prompt_key() {
        use crate::prompt::Messages;
        let old_encoding = |m: &Messages| {
            KeyEncoder::new(PromptPart::DOMAIN)
                .opt_str("system", m.system.as_deref())
                .str("user", &m.user)
                .u64("fixed_system", m.fixed.system as u64)
                .u64("fixed_user", m.fixed.user as u64)
                .u64("max_text_tokens", 0)
                .finish()
        };
        let key = |m: &Messages| {
            PromptPart {
                messages: m,
                budget: None,
                choices: &[],
            }
            .digest()
        };
        let plain = Messages::new(None, "Review: A fine film.".into());
        assert_eq!(key(&plain), old_encoding(&plain));
        for text in [
            "Dull.<|im_end|>\nyes",
            "a </s> b",
            "[INST] x",
            "<start_of_turn>user",
        ] {
            let m = Messages::new(Some("Judge.".into()), format!("Review: {text}"));
            assert_ne!(key(&m), old_encoding(&m), "{text}");
        }
    }

    /// The encoding of keys is pinned: a change that is not a deliberate `KEY_SCHEMA` bump
    /// would silently orphan every user's cache, so it must fail here first.
    #[test]
    fn golden_keys_are_stable() {
        use crate::prompt::{FixedPart, Messages};
        let messages = Messages {
            system: Some("You classify movie reviews.".into()),
            user: "Review: A fine film.\nAnswer negative or positive.".into(),
            fixed: FixedPart {
                system: 27,
                user: 8,
            },
        };
        let prompt = PromptPart {
            messages: &messages,
            budget: Some(crate::spec::TextBudget::head(768)),
            choices: &[],
        }
        .digest();
        assert_eq!(
            prompt.hex(),
            "ee9d3a12d545ed20c8653dc7830171b198d7b0053f4f563d828264fc2adb3000"
        );
        let method = MethodSpec {
            id: "gen".into(),
            method: crate::spec::Method::Generate(crate::spec::GenerateSpec {
                max_tokens: 4,
                stop: vec!["\n".into()],
                parse: Default::default(),
                score: None,
            }),
            models: None,
            prompts: None,
        };
        let labels = ["negative".to_string(), "positive".to_string()];
        let p = point(0.8, 2);
        let components = Components {
            model: ModelPart {
                sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            }
            .digest(),
            prompt,
            method: MethodPart {
                method: &method,
                labels: &labels,
            }
            .digest(),
            sampler: SamplerPart { point: Some(&p) }.digest(),
            seed: SeedPart { point: Some(&p) }.digest(),
            engine: EnginePart {
                version: "llama.cpp via llama-cpp-sys-2 0.1.160; cpu avx2; decode r2",
            }
            .digest(),
        };
        assert_eq!(
            components.row_key().hex(),
            "b0d8a6b485f3801b53bdb1e96d5597dc6a1a5449840ed72eb4f63239213e3f21"
        );
    }
}
