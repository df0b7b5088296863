//! The wall clock of a demo run: the budget shared out between training stages, part-way
//! scorings and the final scoring.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Share of the budget kept for the final sampling and scoring until a part-way scoring has
/// been timed.
const EVAL_SHARE: f64 = 0.12;
/// The wall clock of one demo run: when it ends, how long the final sampling and scoring
/// will take (a share of the budget at first, then timed from the part-way scorings), and
/// the training time spent so far.
pub(super) struct Budget {
    start: Instant,
    end: Instant,
    final_scoring: Cell<f64>,
    /// When the first stage asked for its deadline.
    training_began: Cell<Option<Instant>>,
    /// Seconds of part-way scoring since, which are not training time, and the last one's.
    part_way_scoring: Cell<f64>,
    last_part_way_scoring: Cell<f64>,
}

impl Budget {
    pub(super) fn starting_now(minutes: f64) -> Self {
        let seconds = minutes.max(0.0) * 60.0;
        let start = Instant::now();
        Self {
            start,
            end: start + Duration::from_secs_f64(seconds),
            final_scoring: Cell::new(EVAL_SHARE * seconds),
            training_began: Cell::new(None),
            part_way_scoring: Cell::new(0.0),
            last_part_way_scoring: Cell::new(0.0),
        }
    }

    pub(super) fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Seconds left for training.
    pub(super) fn training_left(&self) -> f64 {
        let left = self
            .end
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        (left - self.final_scoring.get()).max(0.0)
    }

    /// When stage `k` of stages with training-time `shares` should end (asked at its start
    /// and again at each pause).
    pub(super) fn stage_deadline(&self, shares: &[f64], k: usize) -> Instant {
        let now = Instant::now();
        let began = self.training_began.get().unwrap_or(now);
        self.training_began.set(Some(began));
        let spent = (now - began).as_secs_f64() - self.part_way_scoring.get();
        // Every stage but the last is scored at its end, after its deadline and before the
        // next stage starts: that time is not the next stage's to train.
        let scorings_ahead = (shares.len() - 1 - k) as f64 * self.last_part_way_scoring.get();
        let left = (self.training_left() - scorings_ahead).max(0.0);
        let seconds = seconds_to_stage_end(spent, left, shares, k);
        now + Duration::from_secs_f64(seconds)
    }

    /// A part-way scoring of `prompts` prompts per group took `seconds`: the final one, of
    /// `final_prompts`, will take about as much per prompt (a tenth more for safety).
    pub(super) fn scored(&self, seconds: f64, prompts: usize, final_prompts: usize) {
        self.part_way_scoring
            .set(self.part_way_scoring.get() + seconds);
        self.last_part_way_scoring.set(seconds);
        let seconds = 1.1 * seconds * final_prompts as f64 / prompts.max(1) as f64;
        self.final_scoring.set(seconds);
    }
}

/// Seconds from now until stage `k` ends, when training has taken `spent` seconds and has
/// `left` more: the whole training time is shared out by the stages' `shares`, so a stage
/// that asks again part-way keeps its share of the whole, not of what is left.
fn seconds_to_stage_end(spent: f64, left: f64, shares: &[f64], k: usize) -> f64 {
    let total: f64 = shares.iter().sum();
    let through_k: f64 = shares[..=k].iter().sum();
    ((spent + left) * through_k / total.max(1e-9) - spent).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_keeps_its_share_of_the_whole_training_time() {
        let shares = [0.8, 0.2];
        // At the start: 80% of 300 s.
        assert_eq!(seconds_to_stage_end(0.0, 300.0, &shares, 0), 240.0);
        // Asked again after 100 s with 200 s left: it still ends at 240 s, not 100 + 160.
        assert_eq!(seconds_to_stage_end(100.0, 200.0, &shares, 0), 140.0);
        // The finetune gets the rest; a stage already past its end gets nothing more.
        assert_eq!(seconds_to_stage_end(250.0, 50.0, &shares, 1), 50.0);
        assert_eq!(seconds_to_stage_end(250.0, 50.0, &shares, 0), 0.0);
    }
}
