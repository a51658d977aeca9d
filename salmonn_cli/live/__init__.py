"""Live mode: audio heard as it happens, from a microphone (or a file fed at real-time pace).

    source.py     capture: a PortAudio callback (or a paced file) -> bounded block queue -> 16 kHz mono blocks
    segmenter.py  blocks -> segments: utterances cut by silero-vad at the end of speech, or fixed windows
    loop.py       the pipeline: capture and segmentation on the calling thread, the model on a worker thread,
                  a bounded segment queue between them that drops the OLDEST segment (visibly) when full

Nothing here imports torch or sounddevice at module level.
"""
