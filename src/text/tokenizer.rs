//! open_clip's `SimpleTokenizer` (the CLIP tokenizer): text clean-up, byte-level BPE with
//! the CLIP merges, start/end tokens, a 77-token context (or the text tower's own).

use std::collections::HashMap;
use std::io::Read;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

const MERGES_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");
/// open_clip reads merges `[1 : 49152 - 256 - 2 + 1]` of the file (line 0 is a header).
const NUM_MERGES: usize = 49152 - 256 - 2;
/// CLIP's context, and every released MicroDiT text tower's.
pub const CONTEXT_LENGTH: usize = 77;

pub struct ClipTokenizer {
    byte_to_char: [char; 256],
    encoder: HashMap<String, u32>,
    merge_rank: HashMap<(String, String), usize>,
    pattern: Regex,
    pub start_token: u32,
    pub end_token: u32,
    /// Tokens per caption, padding and start/end included (the text tower's
    /// `context_length`).
    pub context_length: usize,
    cache: std::sync::Mutex<HashMap<String, Vec<u32>>>,
}

fn printable(b: u32) -> bool {
    (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b)
}

/// GPT-2's reversible map from bytes to printable characters, so BPE never sees
/// whitespace or control bytes.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        map[b as usize] = if printable(b) {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    map
}

/// The order the reference's vocabulary lists the byte characters in: printable bytes
/// first, then the rest (the insertion order of its `bytes_to_unicode` dict).
fn byte_vocab_order() -> impl Iterator<Item = usize> {
    (0..256u32)
        .filter(|&b| printable(b))
        .chain((0..256u32).filter(|&b| !printable(b)))
        .map(|b| b as usize)
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl ClipTokenizer {
    pub fn new() -> Self {
        let mut text = String::new();
        flate2::read::GzDecoder::new(MERGES_GZ)
            .read_to_string(&mut text)
            .expect("bundled BPE merges are valid gzip");
        let merges: Vec<(String, String)> = text
            .lines()
            .skip(1)
            .take(NUM_MERGES)
            .map(|l| {
                let (a, b) = l.split_once(' ').expect("merge lines hold two symbols");
                (a.to_string(), b.to_string())
            })
            .collect();
        let byte_to_char = bytes_to_unicode();
        let mut vocab: Vec<String> = byte_vocab_order()
            .map(|b| byte_to_char[b].to_string())
            .collect();
        vocab.extend(byte_vocab_order().map(|b| format!("{}</w>", byte_to_char[b])));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        let encoder: HashMap<String, u32> = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let pattern = Regex::new(
            r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .expect("valid pattern");
        Self {
            byte_to_char,
            start_token: encoder["<start_of_text>"],
            end_token: encoder["<end_of_text>"],
            merge_rank: merges
                .into_iter()
                .enumerate()
                .map(|(i, m)| (m, i))
                .collect(),
            encoder,
            pattern,
            cache: Default::default(),
            context_length: CONTEXT_LENGTH,
        }
    }

    /// The same tokenizer for a text tower with another context (open_clip's
    /// `context_length`).
    pub fn with_context_length(self, context_length: usize) -> Self {
        Self {
            context_length,
            ..self
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// BPE of one pre-token (already mapped to byte characters): merge the lowest-ranked
    /// adjacent pair until none is in the merge table.
    fn bpe(&self, token: &str) -> Vec<u32> {
        if let Some(ids) = self.cache.lock().unwrap().get(token) {
            return ids.clone();
        }
        let chars: Vec<char> = token.chars().collect();
        let mut word: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.merge_rank
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&rank| (rank, w))
                })
                .min_by_key(|(rank, _)| *rank)
                .map(|(_, w)| (w[0].clone(), w[1].clone()));
            let Some((first, second)) = best else { break };
            // Merge every occurrence of the pair, left to right, as the reference does.
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        let ids: Vec<u32> = word.iter().map(|w| self.encoder[w]).collect();
        self.cache
            .lock()
            .unwrap()
            .insert(token.to_string(), ids.clone());
        ids
    }

    /// Token ids of `text` without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let text = clean_text(text);
        self.pattern
            .find_iter(&text)
            .flat_map(|m| {
                let mapped: String = m
                    .as_str()
                    .bytes()
                    .map(|b| self.byte_to_char[b as usize])
                    .collect();
                self.bpe(&mapped)
            })
            .collect()
    }

    /// `[start] + tokens + [end]`, zero-padded to the context length; longer prompts are cut
    /// to it with the end token kept last. Also returns whether the prompt was truncated.
    pub fn tokenize(&self, text: &str) -> (Vec<u32>, bool) {
        let n = self.context_length;
        let mut ids = vec![self.start_token];
        ids.extend(self.encode(text));
        ids.push(self.end_token);
        let truncated = ids.len() > n;
        if truncated {
            ids.truncate(n);
            ids[n - 1] = self.end_token;
        }
        ids.resize(n, 0);
        (ids, truncated)
    }
}

/// open_clip's clean-up: `ftfy.fix_text`, HTML unescaping (twice), whitespace folding,
/// lower-casing. Of ftfy, the fixes that apply to ordinary (not mis-decoded) text are
/// implemented: HTML entities, Latin ligatures, full-width characters, curly quotes, NFC.
pub fn clean_text(text: &str) -> String {
    let mut t = fix_text(text);
    for _ in 0..2 {
        t = html_escape::decode_html_entities(&t).into_owned();
    }
    t.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The parts of `ftfy.fix_text` that change ordinary text, in ftfy's order (each sees the
/// previous one's output: a ligature may produce a curly apostrophe to straighten).
fn fix_text(text: &str) -> String {
    // ftfy unescapes HTML only when the text has no '<' (it might be real HTML otherwise).
    let t = if text.contains('<') {
        text.to_string()
    } else {
        html_escape::decode_html_entities(text).into_owned()
    };
    let t: String = t.chars().map(fix_latin_ligature).collect();
    let t: String = t.chars().map(fix_character_width).collect();
    let t: String = t.chars().map(uncurl_quote).collect();
    let t = t
        .replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{0085}'], "\n");
    t.nfc().collect()
}

fn fix_latin_ligature(c: char) -> String {
    match c {
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        _ => return c.to_string(),
    }
    .to_string()
}

/// Full-width (and half-width) forms to their NFKC equivalents, the ideographic space to ' '.
fn fix_character_width(c: char) -> String {
    match c {
        '\u{3000}' => " ".to_string(),
        '\u{ff01}'..='\u{ffef}' => {
            let folded: String = c.nfkc().collect();
            if folded.chars().count() == 1 {
                folded
            } else {
                c.to_string()
            }
        }
        _ => c.to_string(),
    }
}

fn uncurl_quote(c: char) -> char {
    match c {
        '\u{02bc}' | '\u{2018}'..='\u{201b}' => '\'',
        '\u{201c}'..='\u{201f}' => '"',
        _ => c,
    }
}
