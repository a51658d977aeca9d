"""What the model hears, in one place: 16 kHz mono, zero-padded to at least 1 s, at most one 30 s window at once.

Plain numbers with their units in their names, and no imports, so the command line can state these limits
without loading numpy or torch.
"""

SAMPLE_RATE = 16_000  # Hz: what Whisper and BEATs were trained on
MIN_SECONDS = 1.0  # the original pads shorter audio with zeros up to one second
WINDOW_SECONDS = 30.0  # Whisper's receptive field: the model hears at most this much at once
MIN_SAMPLES = int(MIN_SECONDS * SAMPLE_RATE)
WINDOW_SAMPLES = int(WINDOW_SECONDS * SAMPLE_RATE)
WHISPER_FRAMES_PER_WINDOW = 1500  # Whisper encoder frames per 30 s window: 20 ms each
