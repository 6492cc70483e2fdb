"""The learnable preference over path types (LKG-RAG step 4): grid, model, training, ranking."""
