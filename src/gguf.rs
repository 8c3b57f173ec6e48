//! What a GGUF file's header says about its model without loading it: the number of
//! parameters (the elements of all its tensors), for a compute cost that does not depend on
//! the machine (issue #31: `2 × parameters × tokens`).
//!
//! The header is untrusted input: every count and length is bounded before anything is
//! allocated or skipped, and a file that ends early or holds an unknown type is an error,
//! never a panic. Layout (GGUF v2 and v3): magic, version (u32), tensor count (u64), metadata
//! count (u64), the metadata key-value pairs, then one info per tensor (name, dimensions,
//! type, offset); all little-endian.

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The first four bytes of every GGUF file.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (no GGUF magic)")]
    Magic { path: String },
    #[error("{path}: GGUF version {version} is not read here (2 and 3 are)")]
    Version { path: String, version: u32 },
    #[error("{path}: bad header: {why}")]
    Header { path: String, why: String },
}

/// More tensors or metadata entries than any model has: a damaged or hostile header.
const MAX_ENTRIES: u64 = 1 << 20;
/// The longest string (a key, a tensor name, a chat template) read or skipped.
const MAX_STRING: u64 = 16 << 20;
/// The most elements of one metadata array (a vocabulary has a few hundred thousand).
const MAX_ARRAY: u64 = 1 << 24;
/// The most dimensions of a tensor (ggml has 4).
const MAX_DIMS: u32 = 8;

/// The token-embedding table: a lookup per token, not a product.
const TOKEN_EMBEDDING: &[u8] = b"token_embd.weight";
/// The output head of a model whose head is not the embedding table reused ("untied").
const OUTPUT_HEAD: &[u8] = b"output.weight";

/// A model's parameters as its GGUF header counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameters {
    /// Every tensor's elements (what gguf-py counts).
    pub total: u64,
    /// The token-embedding table's elements, and an untied output head's (0 when the head
    /// is the embedding table).
    pub embedding: u64,
    pub head: u64,
}

impl Parameters {
    /// The non-embedding parameters: the N of `2 × N` FLOPs a token (Kaplan et al. 2020),
    /// every weight but the embedding table and the output head, whether tied or not, so
    /// that tied and untied models count alike. (The head's product is computed only for
    /// the tokens whose logits are read: a prompt's last, and each generated one.)
    pub fn per_token(&self) -> u64 {
        self.total - self.embedding - self.head
    }
}

/// The parameters of the model in the GGUF file at `path`: the sum of its tensors'
/// element counts, the token embedding's and the output head's.
pub fn parameters(path: &Path) -> Result<Parameters, GgufError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| GgufError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut r = Header {
        r: BufReader::new(file),
        path: shown,
    };
    let mut magic = [0u8; 4];
    r.read(&mut magic)?;
    if &magic != GGUF_MAGIC {
        return Err(GgufError::Magic { path: r.path });
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version {
            path: r.path,
            version,
        });
    }
    let tensors = r.count("tensor count")?;
    let entries = r.count("metadata count")?;
    for _ in 0..entries {
        r.skip_string()?;
        let kind = r.u32()?;
        r.skip_value(kind, 0)?;
    }
    let (mut total, mut embedding, mut head) = (0u64, 0u64, 0u64);
    for _ in 0..tensors {
        let name = r.name_among(&[TOKEN_EMBEDDING, OUTPUT_HEAD])?;
        let dims = r.u32()?;
        if dims == 0 || dims > MAX_DIMS {
            return Err(r.bad(format!("a tensor with {dims} dimensions")));
        }
        let mut elements: u64 = 1;
        for _ in 0..dims {
            let d = r.u64()?;
            elements = elements
                .checked_mul(d)
                .ok_or_else(|| r.bad("a tensor's size overflows".into()))?;
        }
        r.u32()?; // type
        r.u64()?; // offset
        total = total
            .checked_add(elements)
            .ok_or_else(|| r.bad("the parameter count overflows".into()))?;
        match name {
            Some(0) => embedding = elements,
            Some(_) => head = elements,
            None => {}
        }
    }
    Ok(Parameters {
        total,
        embedding,
        head,
    })
}

struct Header<R> {
    r: R,
    path: String,
}

impl<R: Read + Seek> Header<R> {
    fn bad(&self, why: String) -> GgufError {
        GgufError::Header {
            path: self.path.clone(),
            why,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => self.bad("the file ends inside its header".into()),
            _ => GgufError::Io {
                path: self.path.clone(),
                source: e,
            },
        })
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        let mut b = [0u8; 4];
        self.read(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn count(&mut self, what: &str) -> Result<u64, GgufError> {
        let n = self.u64()?;
        if n > MAX_ENTRIES {
            return Err(self.bad(format!("a {what} of {n}")));
        }
        Ok(n)
    }

    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        let n = i64::try_from(n).map_err(|_| self.bad("a length past the file".into()))?;
        self.r
            .seek(SeekFrom::Current(n))
            .map_err(|source| GgufError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(())
    }

    /// Read a string and say which of `names` it is (only a string as long as one of them
    /// is read; the rest are skipped).
    fn name_among(&mut self, names: &[&[u8]]) -> Result<Option<usize>, GgufError> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(self.bad(format!("a string of {n} bytes")));
        }
        if !names.iter().any(|x| x.len() as u64 == n) {
            self.skip(n)?;
            return Ok(None);
        }
        let mut b = vec![0u8; n as usize];
        self.read(&mut b)?;
        Ok(names.iter().position(|x| *x == b.as_slice()))
    }

    fn skip_string(&mut self) -> Result<(), GgufError> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(self.bad(format!("a string of {n} bytes")));
        }
        self.skip(n)
    }

    /// Skip one metadata value of type `kind` (arrays hold values of one type; an array of
    /// arrays is read one level deep at most).
    fn skip_value(&mut self, kind: u32, depth: u32) -> Result<(), GgufError> {
        match kind {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => self.skip_string(),
            9 if depth < 2 => {
                let item = self.u32()?;
                let n = self.u64()?;
                if n > MAX_ARRAY {
                    return Err(self.bad(format!("an array of {n} values")));
                }
                // Fixed-size items are skipped at once; strings and arrays one by one.
                let size = match item {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    _ => None,
                };
                match size {
                    Some(s) => self.skip(n * s),
                    None => {
                        for _ in 0..n {
                            self.skip_value(item, depth + 1)?;
                        }
                        Ok(())
                    }
                }
            }
            9 => Err(self.bad("arrays nested too deep".into())),
            other => Err(self.bad(format!("an unknown value type {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header with string, integer and array metadata and the given tensors.
    fn header(tensors: &[&[u64]]) -> Vec<u8> {
        let mut b = Vec::new();
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend(3u64.to_le_bytes());
        string(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        string(&mut b, "llama");
        string(&mut b, "llama.block_count");
        b.extend(4u32.to_le_bytes());
        b.extend(30u32.to_le_bytes());
        string(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        string(&mut b, "<s>");
        string(&mut b, "hello");
        for (i, dims) in tensors.iter().enumerate() {
            let name = match i {
                0 => "token_embd.weight".to_string(),
                1 => "output.weight".to_string(),
                _ => format!("blk.{i}.weight"),
            };
            string(&mut b, &name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(0u32.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        b
    }

    fn count(bytes: &[u8]) -> Result<Parameters, GgufError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).unwrap();
        parameters(&p)
    }

    #[test]
    fn parameters_sum_every_tensors_elements() {
        let p = count(&header(&[&[4, 3], &[7], &[2, 2, 2]])).unwrap();
        assert_eq!(
            (p.total, p.embedding, p.head, p.per_token()),
            (12 + 7 + 8, 12, 7, 8)
        );
        // A tied model (no output tensor): its head is the embedding table.
        let tied = count(&header(&[&[4, 3]])).unwrap();
        assert_eq!((tied.total, tied.head, tied.per_token()), (12, 0, 0));
        let none = count(&header(&[])).unwrap();
        assert_eq!((none.total, none.embedding, none.head), (0, 0, 0));
    }

    #[test]
    fn damaged_headers_are_errors_not_panics() {
        let good = header(&[&[4, 3]]);
        for cut in [3, 10, 30, good.len() - 1] {
            assert!(count(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            count(&huge)
                .unwrap_err()
                .to_string()
                .contains("tensor count")
        );
        let overflow = header(&[&[u64::MAX, 3]]);
        assert!(
            count(&overflow)
                .unwrap_err()
                .to_string()
                .contains("overflows")
        );
        assert!(matches!(
            count(b"NOPE\x03\0\0\0"),
            Err(GgufError::Magic { .. })
        ));
        let mut v9 = good;
        v9[4..8].copy_from_slice(&9u32.to_le_bytes());
        assert!(matches!(
            count(&v9),
            Err(GgufError::Version { version: 9, .. })
        ));
    }
}
