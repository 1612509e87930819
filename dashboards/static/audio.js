// Vigil ICU board: IEC 60601-1-8-style alarm tones with the Web Audio API (no audio files).
// Browsers only allow sound after a user gesture, so the board must be armed by a click; until then (or when the
// browser suspends the audio context) `armed` is false and the board shows AUDIO OFF.

// Burst patterns, in ms from the start of the burst: [pulse start, pulse length]. IEC 60601-1-8 table 3:
// high: 10 pulses (3 + 2, pause, 3 + 2), pulse 75-200 ms, spacing 50-125 ms, repeat every 2.5-15 s;
// medium: 3 pulses of 125-250 ms, spacing 125-250 ms, repeat every 2.5-30 s; low: 1-2 pulses, repeat > 15 s.
const P = 150; // high pulse length
const S = 100; // high pulse spacing
const highGroup = (t0) => [0, 1, 2].map((i) => [t0 + i * (P + S), P])
  .concat([[t0 + 3 * P + 4 * S + P, P], [t0 + 4 * P + 5 * S + P, P]]);
export const PATTERNS = {
  high: { pulses: [...highGroup(0), ...highGroup(2400)], every: 8000, freq: 660 },
  medium: { pulses: [[0, 200], [400, 200], [800, 200]], every: 10000, freq: 520 },
  low: { pulses: [[0, 200], [400, 200]], every: 20000, freq: 440 },
};

const HARMONICS = [0, 1, 0.6, 0.45, 0.3, 0.2]; // fundamental plus 4 harmonics: easy to localise
const RAMP_S = 0.015;

export class AlarmAudio {
  constructor() {
    this.ctx = null;
    this.wave = null;
    this.playing = null; // priority currently repeating
    this.nextAt = 0; // performance time (ms) of the next burst
    this.onchange = () => {};
  }

  get armed() {
    return this.ctx !== null && this.ctx.state === "running";
  }

  // Must run inside a click handler (the autoplay rule). A short low chirp confirms the speakers work.
  async arm() {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return false;
    if (!this.ctx) {
      this.ctx = new Ctx();
      this.ctx.onstatechange = () => this.onchange();
      const n = HARMONICS.length;
      this.wave = this.ctx.createPeriodicWave(new Float32Array(n), Float32Array.from(HARMONICS));
    }
    try { await this.ctx.resume(); } catch { /* stays suspended: AUDIO OFF */ }
    if (this.armed) this.burst({ pulses: [[0, 120]], freq: 440 }, 0.25);
    this.onchange();
    return this.armed;
  }

  // Called once a second and on every alert change with the priority that should sound (or null).
  update(priority, nowMs) {
    if (!this.armed || !priority || !PATTERNS[priority]) {
      this.playing = null;
      return;
    }
    if (priority !== this.playing) {
      // A new or higher priority starts at once; the lower one stops (one tone at a time).
      this.playing = priority;
      this.nextAt = nowMs;
    }
    if (nowMs >= this.nextAt) {
      const pattern = PATTERNS[priority];
      this.burst(pattern, 0.5);
      this.nextAt = nowMs + pattern.every;
    }
  }

  burst(pattern, volume) {
    const ctx = this.ctx;
    const t0 = ctx.currentTime + 0.05;
    for (const [start, length] of pattern.pulses) {
      const osc = ctx.createOscillator();
      const gain = ctx.createGain();
      osc.setPeriodicWave(this.wave);
      osc.frequency.value = pattern.freq;
      const a = t0 + start / 1000;
      const b = a + length / 1000;
      gain.gain.setValueAtTime(0, a);
      gain.gain.linearRampToValueAtTime(volume, a + RAMP_S);
      gain.gain.setValueAtTime(volume, b - RAMP_S);
      gain.gain.linearRampToValueAtTime(0, b);
      osc.connect(gain).connect(ctx.destination);
      osc.start(a);
      osc.stop(b + 0.02);
    }
    this.bursts = (this.bursts || 0) + 1; // for tests: how many bursts were scheduled
    this.lastBurst = pattern === PATTERNS.high ? "high" : pattern === PATTERNS.medium ? "medium"
      : pattern === PATTERNS.low ? "low" : "test";
  }
}
