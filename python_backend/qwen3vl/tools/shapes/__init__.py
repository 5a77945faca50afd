"""The demo task: pictures of coloured shapes, questions about them, and the model trained on them.

- `scenes`: a seeded generator of pictures (white canvas, one to three coloured shapes) with the
  facts about each picture;
- `questions`: the questions asked of a picture and their one right answer, and how an answer is
  graded;
- `train`: `qwen3vl-train-demo`, which trains a small Qwen3-VL-MoE with transformers on them and
  writes a checkpoint in the release's layout.
"""
