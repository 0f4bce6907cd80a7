//! The window of appends sent to a follower in the Replicate state and not yet acknowledged.

/// A bounded FIFO of the last index of each in-flight append, with the bytes it carried.
///
/// Invariant: indices in the window are strictly increasing from the front to the back, since
/// appends to one follower go out in log order.
#[derive(Debug, Clone)]
pub struct Inflights {
    // Ring buffer. Grows lazily up to `cap` so idle followers cost little memory.
    buf: Vec<(u64, u64)>,
    start: usize,
    count: usize,
    bytes: u64,
    /// Maximum number of in-flight appends. Bounds memory on the leader and the amount of data
    /// resent after a follower rejects in the middle of a long pipeline.
    cap: usize,
    /// Maximum bytes in flight (0 = unlimited). Bounds transport buffers per follower.
    max_bytes: u64,
}

impl Inflights {
    pub fn new(cap: usize, max_bytes: u64) -> Self {
        assert!(cap > 0, "inflight window must allow at least one message");
        Inflights {
            buf: Vec::new(),
            start: 0,
            count: 0,
            bytes: 0,
            cap,
            max_bytes,
        }
    }

    pub fn full(&self) -> bool {
        self.count == self.cap || (self.max_bytes != 0 && self.bytes >= self.max_bytes)
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn add(&mut self, index: u64, bytes: u64) {
        assert!(!self.full(), "cannot add to a full inflight window");
        if self.count > 0 {
            let last = self.buf[(self.start + self.count - 1) % self.buf.len()].0;
            assert!(
                index > last,
                "inflight index {index} not above the last one {last}"
            );
        }
        let mut next = self.start + self.count;
        if self.buf.len() < self.cap && next >= self.buf.len() {
            // Unwrap the ring into a larger buffer; only happens while growing. Not `clamp`: a
            // window smaller than the initial growth step is valid.
            let mut grown = Vec::with_capacity((self.buf.len() * 2).max(4).min(self.cap));
            for i in 0..self.count {
                grown.push(self.buf[(self.start + i) % self.buf.len()]);
            }
            grown.push((index, bytes));
            self.buf = grown;
            self.start = 0;
            self.count += 1;
            self.bytes += bytes;
            return;
        }
        next %= self.buf.len();
        self.buf[next] = (index, bytes);
        self.count += 1;
        self.bytes += bytes;
    }

    /// Frees every in-flight append whose last index is at or below `to`.
    pub fn free_le(&mut self, to: u64) {
        while self.count > 0 {
            let (idx, b) = self.buf[self.start];
            if idx > to {
                break;
            }
            self.start = (self.start + 1) % self.buf.len();
            self.count -= 1;
            self.bytes -= b;
        }
        if self.count == 0 {
            self.start = 0;
        }
    }

    /// Frees the oldest append: a heartbeat response proves the follower is alive, so one more
    /// message may go out even when acknowledgements were lost.
    pub fn free_first_one(&mut self) {
        if self.count > 0 {
            let to = self.buf[self.start].0;
            self.free_le(to);
        }
    }

    pub fn reset(&mut self) {
        self.start = 0;
        self.count = 0;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_free_wrap() {
        let mut f = Inflights::new(4, 0);
        for i in 1..=4 {
            assert!(!f.full());
            f.add(i, 10);
        }
        assert!(f.full());
        f.free_le(2);
        assert_eq!(f.count(), 2);
        f.add(5, 10);
        f.add(6, 10);
        assert!(f.full());
        // Freeing below the front is a no-op.
        f.free_le(1);
        assert_eq!(f.count(), 4);
        f.free_first_one();
        assert_eq!(f.count(), 3);
        f.free_le(6);
        assert_eq!(f.count(), 0);
        assert!(!f.full());
    }

    #[test]
    fn byte_limit() {
        let mut f = Inflights::new(100, 25);
        f.add(1, 10);
        f.add(2, 10);
        assert!(!f.full());
        f.add(3, 10);
        assert!(f.full(), "30 bytes in flight is over the 25-byte limit");
        f.free_le(1);
        assert!(!f.full());
        f.reset();
        assert_eq!(f.count(), 0);
    }

    #[test]
    #[should_panic(expected = "not above")]
    fn indices_must_increase() {
        let mut f = Inflights::new(4, 0);
        f.add(5, 1);
        f.add(5, 1);
    }

    #[test]
    fn window_smaller_than_the_growth_step() {
        // Regression (found by tests/fuzz_step.rs): growing panicked for a cap below 4.
        for cap in 1..=3 {
            let mut f = Inflights::new(cap, 0);
            for i in 1..=cap as u64 {
                f.add(i, 1);
            }
            assert!(f.full());
            f.free_first_one();
            f.add(10, 1);
            assert_eq!(f.count(), cap);
        }
    }

    #[test]
    fn grows_and_keeps_order() {
        let mut f = Inflights::new(64, 0);
        for i in 1..=40 {
            f.add(i, 1);
            if i % 3 == 0 {
                f.free_first_one();
            }
        }
        // 40 added, 13 freed from the front.
        assert_eq!(f.count(), 27);
        f.free_le(39);
        assert_eq!(f.count(), 1);
    }
}
