"""`task.type: sequence_classification`: a classification head, with one module per problem type
(single_label, multi_label, regression) and what they share (tokenization, batches, packing)."""
