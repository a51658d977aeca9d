"""`salmonn train`: build an audio LLM from a recipe (SpeechVerse's or SALMONN's), stage by stage."""
