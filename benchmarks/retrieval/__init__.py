"""The retriever: training and candidates at catalogue scale (`bench`, part of `make bench`), the
search of its settings on validation (`tune`, `make tune-retriever`), and sampled against full
softmax (`sampled_softmax`)."""
