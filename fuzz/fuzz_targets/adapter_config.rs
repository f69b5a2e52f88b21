//! adapter.json as read from an adapters folder: parsing, the checks that
//! refuse a bad adapter, and, for one that passes, building its detector,
//! detecting values and finding contexts. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use steerling::steering::adapter::{AdapterConfig, DetectionRule};
use steerling::steering::Detector;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = serde_json::from_slice::<AdapterConfig>(data) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    let Ok(detector) = Detector::new(&config) else {
        return;
    };
    let text = String::from_utf8_lossy(data);
    for rule in [DetectionRule::LastMention, DetectionRule::Majority] {
        let _ = detector.detect_with(&text, rule);
    }
    let context = config.find_context(&text);
    assert!(context == "default" || config.targets.contexts.contains_key(&context));
});
