"""A status's `tuning` member (contract 1.4) survives the wire and is read leniently."""

import json

from edgerun.contract import CONTRACT_VERSION, Status, TunedCandidate, TuningInfo


def _tuning() -> TuningInfo:
    fast = TunedCandidate("onnx-fp32", "onnxruntime", {"threads": 2}, 0.041, 0.002, 3 << 20, None)
    wrong = TunedCandidate("onnx-int8", "onnxruntime", {"threads": 1}, 0.03, 0.001, 2 << 20, 0.41, False,
                           "agrees with fp32 on 41% of the validation sample")
    return TuningInfo("digits", 2, chosen=fast, default=TunedCandidate("onnx-fp32", "openvino"),
                      candidates=(fast, wrong), cpu_model="Intel(R) Core(TM) i5-8259U", cpu_class="x86",
                      profile="x86-generic", seconds=11.4, complete=True, ts=1795397650.0)


def test_tuning_round_trips_through_a_status_payload():
    status = Status("pi-1", "lab", tuning=(_tuning(),))
    back = Status.from_payload(status.to_payload())
    assert back is not None and back.contract == CONTRACT_VERSION == "1.4"
    assert back.tuning == (_tuning(),)
    assert back.tuning[0].candidates[1].kept is False and "41%" in back.tuning[0].candidates[1].reason


def test_a_status_without_tuning_or_with_a_bad_entry_keeps_the_rest():
    old = json.dumps({"device": "old", "fleet": "lab", "contract": "1.3", "models": []}).encode()
    assert Status.from_payload(old).tuning == ()
    d = Status("pi-1", "lab", tuning=(_tuning(),)).to_dict()
    d["tuning"].insert(0, {"model": 7})  # not a model name: left out
    d["tuning"][1]["candidates"].append("garbage")
    d["tuning"][1]["chosen"]["options"]["nested"] = {"no": "dicts"}
    back = Status.from_payload(json.dumps(d).encode())
    assert [t.model for t in back.tuning] == ["digits"]
    assert len(back.tuning[0].candidates) == 2 and back.tuning[0].chosen.options == {"threads": 2}
