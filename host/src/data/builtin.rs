//! The built-in data set: a seeded, procedurally generated world in which the
//! paper's experiment can be run end to end with no download.
//!
//! The world has one exactly measurable capability, decimal addition written in
//! text (`23+45=68`), learned during pretraining and exercised through an
//! assistant format taught by SFT (`Q: 23+45\nA: 68\n`). Preference pairs reward a
//! style the judge can score programmatically: a polite prefix and a closing
//! exclamation mark (`Sure, 68!`). The chosen answers were "written carelessly":
//! with probability `chosen_answer_error` their number is wrong, while the
//! rejected answers are always right. Labels therefore reward style and are blind
//! to arithmetic, which is what makes naive alignment pay an alignment tax on the
//! capability: DPO raises the likelihood of wrong sums along with the style.
//!
//! Addition problems are split once, by a hash of the operands that does not depend
//! on the seed, into a training part and a held-out part (`HELDOUT_PERCENT`), so no
//! evaluation problem is ever seen in pretraining, SFT or preference data whatever
//! seeds are used for each.
//!
//! Every function is a pure function of its configuration and seed (SplitMix64
//! streams, integer arithmetic only), so runs are reproducible across machines.

/// Percentage of all addition problems reserved for evaluation.
pub const HELDOUT_PERCENT: u64 = 20;

/// The polite prefix the preference data rewards.
pub const STYLE_PREFIX: &str = "Sure, ";
/// The closing mark the preference data rewards.
pub const STYLE_SUFFIX: &str = "!";
/// Every document, prompt and response ends at a newline; generation stops there.
pub const END: char = '\n';

/// What the generator produces and how hard the capability is.
#[derive(Clone, Debug, PartialEq)]
pub struct BuiltinConfig {
    /// The first operand is drawn uniformly from `0..10^digits`.
    pub digits: u32,
    /// The second operand is drawn uniformly from `0..10^b_digits`. Adding a
    /// single digit (the default) is learnable by a ~100k-parameter model in the
    /// demo's CPU budget; two-digit plus two-digit was not (5% held-out accuracy
    /// after 3000 steps, measured).
    pub b_digits: u32,
    /// Fraction of pretraining lines that are addition facts (the rest are
    /// sentences of the toy grammar).
    pub arith_fraction: f64,
    /// Fraction of SFT responses already written in the rewarded style, so the SFT
    /// model knows the style exists (as real SFT models do).
    pub sft_style_fraction: f64,
    /// Probability that a chosen (styled) answer states a wrong sum.
    pub chosen_answer_error: f64,
}

impl Default for BuiltinConfig {
    fn default() -> Self {
        Self { digits: 2, b_digits: 1, arith_fraction: 0.6, sft_style_fraction: 0.25, chosen_answer_error: 0.3 }
    }
}

impl BuiltinConfig {
    /// Rejects settings that would make an empty or degenerate data set.
    pub fn validate(&self) -> Result<(), String> {
        for (name, d) in [("digits", self.digits), ("b_digits", self.b_digits)] {
            if !(1..=6).contains(&d) {
                return Err(format!("builtin data: {name} = {d} must be in 1..=6"));
            }
        }
        for (name, v) in [
            ("arith_fraction", self.arith_fraction),
            ("sft_style_fraction", self.sft_style_fraction),
            ("chosen_answer_error", self.chosen_answer_error),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("builtin data: {name} = {v} must be in [0, 1]"));
            }
        }
        Ok(())
    }

    fn operand_limits(&self) -> (u64, u64) {
        (10u64.pow(self.digits), 10u64.pow(self.b_digits))
    }
}

/// One addition problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    pub a: u64,
    pub b: u64,
}

impl Problem {
    pub fn answer(&self) -> u64 {
        self.a + self.b
    }

    /// Whether this problem belongs to the evaluation split. Depends only on the
    /// operands, so every seed and every generator call agree on the split.
    pub fn is_heldout(&self) -> bool {
        let mut s = SplitMix64::new(self.a.wrapping_mul(0x1_0000_0001) ^ self.b.rotate_left(29) ^ 0xADD);
        s.next_u64() % 100 < HELDOUT_PERCENT
    }

    /// The pretraining form: `23+45=68`.
    pub fn fact(&self) -> String {
        format!("{}+{}={}", self.a, self.b, self.answer())
    }

    /// The assistant-format prompt: `Q: 23+45\nA: `.
    pub fn prompt(&self) -> String {
        format!("Q: {}+{}\nA: ", self.a, self.b)
    }
}

/// A prompt and the response SFT teaches.
#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    pub prompt: String,
    pub response: String,
}

/// One preference pair in TRL's layout.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// Which stream a generator call draws from; each purpose gets its own stream so
/// that, e.g., asking for more SFT examples never changes the preference pairs.
#[derive(Clone, Copy)]
enum Stream {
    Pretrain = 1,
    HeldoutText = 2,
    Sft = 3,
    Preference = 4,
    HeldoutPreference = 5,
    Capability = 6,
}

/// The data set's generator: SplitMix64, fully specified, so the data set is the
/// same on every platform (one definition for the workspace, in merge-core).
pub use merge_core::rng::SplitMix64;

fn stream(seed: u64, s: Stream) -> SplitMix64 {
    // Mixing the stream id through one SplitMix64 step keeps nearby seeds apart.
    let mut m = SplitMix64::new(seed ^ ((s as u64) << 56));
    SplitMix64::new(m.next_u64())
}

/// The built-in generator for one configuration and seed.
#[derive(Clone, Debug)]
pub struct Builtin {
    pub config: BuiltinConfig,
    pub seed: u64,
}

impl Builtin {
    pub fn new(config: BuiltinConfig, seed: u64) -> Result<Self, String> {
        config.validate()?;
        Ok(Self { config, seed })
    }

    fn problem(&self, rng: &mut SplitMix64, heldout: bool) -> Problem {
        let (la, lb) = self.config.operand_limits();
        loop {
            let p = Problem { a: rng.below(la), b: rng.below(lb) };
            if p.is_heldout() == heldout {
                return p;
            }
        }
    }

    /// A sentence of the toy grammar, e.g. `the small cat sees a red ball.`
    fn sentence(rng: &mut SplitMix64) -> String {
        const DET: &[&str] = &["the", "a", "this", "that", "every"];
        const ADJ: &[&str] = &["small", "big", "red", "blue", "old", "new", "quiet", "happy"];
        const NOUN: &[&str] = &["cat", "dog", "bird", "ball", "tree", "house", "boat", "child"];
        const VERB: &[&str] = &["sees", "finds", "likes", "pulls", "follows", "paints"];
        let mut s = String::new();
        s.push_str(rng.pick(DET));
        s.push(' ');
        if rng.below(2) == 0 {
            s.push_str(rng.pick(ADJ));
            s.push(' ');
        }
        s.push_str(rng.pick(NOUN));
        s.push(' ');
        s.push_str(rng.pick(VERB));
        s.push(' ');
        s.push_str(rng.pick(DET));
        s.push(' ');
        s.push_str(rng.pick(ADJ));
        s.push(' ');
        s.push_str(rng.pick(NOUN));
        s.push('.');
        s
    }

    fn text_line(&self, rng: &mut SplitMix64, heldout: bool) -> String {
        let mut line = if rng.unit() < self.config.arith_fraction {
            self.problem(rng, heldout).fact()
        } else {
            Self::sentence(rng)
        };
        line.push(END);
        line
    }

    /// `n` pretraining lines, each ending in a newline; addition facts only from
    /// the training split.
    pub fn pretrain_text(&self, n: usize) -> Vec<String> {
        let mut rng = stream(self.seed, Stream::Pretrain);
        (0..n).map(|_| self.text_line(&mut rng, false)).collect()
    }

    /// `n` held-out lines from the same distribution for perplexity: addition
    /// facts from the evaluation split, sentences from an independent stream.
    pub fn heldout_text(&self, n: usize) -> Vec<String> {
        let mut rng = stream(self.seed, Stream::HeldoutText);
        (0..n).map(|_| self.text_line(&mut rng, true)).collect()
    }

    fn styled(answer: u64) -> String {
        format!("{STYLE_PREFIX}{answer}{STYLE_SUFFIX}{END}")
    }

    fn plain(answer: u64) -> String {
        format!("{answer}{END}")
    }

    /// A wrong sum that looks plausible: one digit of the true sum changed.
    fn wrong_answer(rng: &mut SplitMix64, answer: u64) -> u64 {
        let digits = answer.to_string().len() as u32;
        let place = 10u64.pow(rng.below(digits as u64) as u32);
        let d = (answer / place) % 10;
        let nd = (d + 1 + rng.below(9)) % 10;
        let w = answer - d * place + nd * place;
        // Changing the leading digit to 0 would change the length; keep it honest
        // by falling back to +1 then, which is always a different number.
        if w.to_string().len() as u32 != digits { answer + 1 } else { w }
    }

    /// `n` SFT examples from the training split.
    pub fn sft(&self, n: usize) -> Vec<SftExample> {
        let mut rng = stream(self.seed, Stream::Sft);
        (0..n)
            .map(|_| {
                let p = self.problem(&mut rng, false);
                let response = if rng.unit() < self.config.sft_style_fraction {
                    Self::styled(p.answer())
                } else {
                    Self::plain(p.answer())
                };
                SftExample { prompt: p.prompt(), response }
            })
            .collect()
    }

    fn pair(&self, rng: &mut SplitMix64, heldout: bool) -> PreferencePair {
        let p = self.problem(rng, heldout);
        let stated = if rng.unit() < self.config.chosen_answer_error {
            Self::wrong_answer(rng, p.answer())
        } else {
            p.answer()
        };
        PreferencePair { prompt: p.prompt(), chosen: Self::styled(stated), rejected: Self::plain(p.answer()) }
    }

    /// `n` preference pairs for training, from the training split.
    pub fn preferences(&self, n: usize) -> Vec<PreferencePair> {
        let mut rng = stream(self.seed, Stream::Preference);
        (0..n).map(|_| self.pair(&mut rng, false)).collect()
    }

    /// `n` held-out preference pairs (evaluation split) for preference accuracy
    /// and reward margin.
    pub fn heldout_preferences(&self, n: usize) -> Vec<PreferencePair> {
        let mut rng = stream(self.seed, Stream::HeldoutPreference);
        (0..n).map(|_| self.pair(&mut rng, true)).collect()
    }

    /// `n` distinct held-out problems for capability accuracy (fewer if the
    /// evaluation split is smaller than `n`).
    pub fn capability_problems(&self, n: usize) -> Vec<Problem> {
        let (la, lb) = self.config.operand_limits();
        let total = la * lb;
        let mut rng = stream(self.seed, Stream::Capability);
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        // Bounded so a tiny problem space cannot loop forever; the split holds
        // about HELDOUT_PERCENT of `total` problems.
        let mut tries = 0u64;
        while out.len() < n && tries < 64 * total.max(n as u64) {
            tries += 1;
            let p = Problem { a: rng.below(la), b: rng.below(lb) };
            if p.is_heldout() && seen.insert(p) {
                out.push(p);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(seed: u64) -> Builtin {
        Builtin::new(BuiltinConfig::default(), seed).unwrap()
    }

    fn parse_fact(line: &str) -> Option<(u64, u64, u64)> {
        let (lhs, c) = line.trim_end().split_once('=')?;
        let (a, b) = lhs.split_once('+')?;
        Some((a.parse().ok()?, b.parse().ok()?, c.parse().ok()?))
    }

    fn parse_prompt(prompt: &str) -> Problem {
        let body = prompt.strip_prefix("Q: ").unwrap().strip_suffix("\nA: ").unwrap();
        let (a, b) = body.split_once('+').unwrap();
        Problem { a: a.parse().unwrap(), b: b.parse().unwrap() }
    }

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let (a, b, c) = (mk(7), mk(7), mk(8));
        assert_eq!(a.pretrain_text(200), b.pretrain_text(200));
        assert_eq!(a.sft(50), b.sft(50));
        assert_eq!(a.preferences(50), b.preferences(50));
        assert_eq!(a.capability_problems(30), b.capability_problems(30));
        assert_ne!(a.pretrain_text(200), c.pretrain_text(200));
        assert_ne!(a.preferences(50), c.preferences(50));
    }

    #[test]
    fn streams_are_independent_of_request_sizes() {
        let g = mk(3);
        // Asking for a longer list extends it without changing its prefix.
        assert_eq!(g.preferences(10)[..], g.preferences(40)[..10]);
        assert_eq!(g.pretrain_text(10)[..], g.pretrain_text(100)[..10]);
    }

    #[test]
    fn split_is_respected_everywhere() {
        let g = mk(11);
        let mut facts = 0;
        for line in g.pretrain_text(2000) {
            assert!(line.ends_with(END));
            if let Some((a, b, c)) = parse_fact(&line) {
                facts += 1;
                assert_eq!(a + b, c, "pretraining fact must be true: {line:?}");
                assert!(!Problem { a, b }.is_heldout(), "held-out problem leaked: {line:?}");
            }
        }
        assert!((1000..1400).contains(&facts), "arith_fraction 0.6 gave {facts} of 2000");
        for ex in g.sft(500) {
            assert!(!parse_prompt(&ex.prompt).is_heldout());
        }
        for pr in g.preferences(500) {
            assert!(!parse_prompt(&pr.prompt).is_heldout());
        }
        for pr in g.heldout_preferences(200) {
            assert!(parse_prompt(&pr.prompt).is_heldout());
        }
        for line in g.heldout_text(500) {
            if let Some((a, b, _)) = parse_fact(&line) {
                assert!(Problem { a, b }.is_heldout());
            }
        }
        let probs = g.capability_problems(150);
        assert_eq!(probs.len(), 150);
        assert!(probs.iter().all(|p| p.is_heldout() && p.a < 100 && p.b < 10));
        // The split holds about 200 of the 1000 problems; asking for more gives
        // every one of them once.
        let all = g.capability_problems(5000);
        assert!((150..250).contains(&all.len()), "{}", all.len());
        let distinct: std::collections::HashSet<_> = probs.iter().collect();
        assert_eq!(distinct.len(), probs.len());
    }

    #[test]
    fn heldout_share_matches_constant() {
        let held = (0..100u64).flat_map(|a| (0..100u64).map(move |b| Problem { a, b })).filter(|p| p.is_heldout()).count();
        // 10,000 problems, 20% expected; binomial sd is 40.
        assert!((1800..2200).contains(&held), "held-out share {held} / 10000");
    }

    #[test]
    fn preference_pairs_reward_style_and_carry_careless_sums() {
        let g = mk(5);
        let pairs = g.preferences(2000);
        let mut wrong = 0;
        for pr in &pairs {
            let p = parse_prompt(&pr.prompt);
            assert_eq!(pr.rejected, format!("{}\n", p.answer()));
            let body = pr.chosen.strip_prefix(STYLE_PREFIX).unwrap().strip_suffix("!\n").unwrap();
            let stated: u64 = body.parse().unwrap();
            if stated != p.answer() {
                wrong += 1;
                assert_eq!(stated.to_string().len(), p.answer().to_string().len());
            }
        }
        // chosen_answer_error 0.3 of 2000: mean 600, sd about 20.
        assert!((520..680).contains(&wrong), "wrong chosen answers: {wrong}");
    }

    #[test]
    fn sft_mixes_in_a_little_style() {
        let g = mk(9);
        let ex = g.sft(2000);
        let styled = ex.iter().filter(|e| e.response.starts_with(STYLE_PREFIX)).count();
        assert!((420..580).contains(&styled), "styled SFT responses: {styled}");
        for e in &ex {
            let p = parse_prompt(&e.prompt);
            let digits: String = e.response.chars().filter(|c| c.is_ascii_digit()).collect();
            assert_eq!(digits.parse::<u64>().unwrap(), p.answer(), "SFT answers are always right");
        }
    }

    #[test]
    fn wrong_answer_always_differs() {
        let mut rng = SplitMix64::new(1);
        for ans in [0u64, 1, 9, 10, 99, 100, 198, 1234] {
            for _ in 0..200 {
                assert_ne!(Builtin::wrong_answer(&mut rng, ans), ans);
            }
        }
    }

    #[test]
    fn bad_config_is_named() {
        let e = Builtin::new(BuiltinConfig { digits: 0, ..Default::default() }, 1).unwrap_err();
        assert!(e.contains("digits"), "{e}");
        let e = Builtin::new(BuiltinConfig { chosen_answer_error: 1.5, ..Default::default() }, 1).unwrap_err();
        assert!(e.contains("chosen_answer_error"), "{e}");
    }
}
