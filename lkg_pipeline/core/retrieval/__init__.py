"""The first stage: sequential retrievers (LRURec, SASRec) and the candidates they emit."""
