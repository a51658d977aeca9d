"""`salmonn eval`: answer a test set's manifest through the task commands' batch path, then score the answers
with the metric libraries the field uses (jiwer, sacrebleu, the COCO caption metrics) beside the paper's figure."""
