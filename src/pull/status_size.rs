//! Keeps a Prefetch status under a size in bytes, whatever its spec holds:
//! 256 image references of 4,096 characters make a status of a megabyte,
//! which the API server refuses, so it would never be written.

use crate::api::PrefetchStatus;
use crate::names::quoted;

/// The most a status may take, serialized as JSON.
pub const MAX_STATUS_BYTES: usize = 64 * 1024;

/// The longest `message` kept (and the Ready condition's), in characters.
const MESSAGE_MAX: usize = 4096;

/// Room kept for the note saying what was left out.
const NOTE_ROOM: usize = 256;

fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

/// `text` cut to [`MESSAGE_MAX`] characters, saying so.
fn cut(text: &mut String) {
    let length = text.chars().count();
    if length > MESSAGE_MAX {
        let head: String = text.chars().take(MESSAGE_MAX).collect();
        *text = format!("{head}... ({length} characters)");
    }
}

/// `status`, made to fit in `max_bytes` of JSON: long messages are cut,
/// then the last failures, then the last images are left out, and the
/// message says how many images the list shows. A status that fits is
/// returned unchanged.
pub fn bound_status(mut status: PrefetchStatus, max_bytes: usize) -> PrefetchStatus {
    let mut size = json_len(&status);
    if size <= max_bytes {
        return status;
    }
    if let Some(message) = status.message.as_mut() {
        cut(message);
    }
    for condition in &mut status.conditions {
        cut(&mut condition.message);
    }
    size = json_len(&status);
    let budget = max_bytes.saturating_sub(NOTE_ROOM);
    // Each item costs its JSON and a comma.
    while size > budget {
        let Some(failure) = status.failures.pop() else {
            break;
        };
        size = size.saturating_sub(json_len(&failure) + 1);
    }
    let all_images = status.images.len();
    while size > budget {
        let Some(image) = status.images.pop() else {
            break;
        };
        size = size.saturating_sub(json_len(&image) + 1);
    }
    if status.images.len() < all_images {
        let note = format!(
            "status.images lists {} of {all_images} images: a status is kept under {max_bytes} bytes",
            status.images.len()
        );
        status.message = Some(match status.message.take() {
            Some(message) => format!("{message}; {note}"),
            None => note,
        });
    }
    if json_len(&status) > max_bytes {
        // Only the other fields are left, and they are small unless the
        // message is: say so rather than be refused by the API server.
        status.message = Some(format!(
            "the status was too large to show; first of the message: {}",
            quoted(status.message.as_deref().unwrap_or_default())
        ));
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Condition, Phase, PullFailure};

    fn status(images: usize, image_length: usize, message_length: usize) -> PrefetchStatus {
        PrefetchStatus {
            phase: Some(Phase::Failed),
            images: (0..images)
                .map(|i| format!("{i:04}{}", "a".repeat(image_length.saturating_sub(4))))
                .collect(),
            failures: (0..20)
                .map(|i| PullFailure {
                    node: format!("node-{i}"),
                    image: "x".repeat(image_length),
                    reason: "ErrImagePull".into(),
                    attempts: 1,
                    last_error: "e".repeat(1000),
                    permanent: false,
                })
                .collect(),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "Failed".into(),
                message: "m".repeat(message_length),
                last_transition_time: "2026-01-01T00:00:00Z".into(),
            }],
            message: Some("m".repeat(message_length)),
            ..PrefetchStatus::default()
        }
    }

    #[test]
    fn a_small_status_is_unchanged() {
        let small = status(3, 20, 50);
        assert_eq!(bound_status(small.clone(), MAX_STATUS_BYTES), small);
    }

    #[test]
    fn a_huge_status_fits_and_says_what_it_left_out() {
        let huge = status(256, 4096, 300_000);
        assert!(json_len(&huge) > 1_000_000);
        let bounded = bound_status(huge, MAX_STATUS_BYTES);
        assert!(
            json_len(&bounded) <= MAX_STATUS_BYTES,
            "{}",
            json_len(&bounded)
        );
        assert!(bounded.failures.is_empty());
        let shown = bounded.images.len();
        assert!(shown > 0 && shown < 256, "{shown}");
        assert_eq!(
            bounded
                .message
                .as_deref()
                .map(|m| m.rsplit("; ").next().unwrap_or_default()),
            Some(
                format!(
                    "status.images lists {shown} of 256 images: a status is kept under 65536 bytes"
                )
                .as_str()
            )
        );
        assert!(
            bounded
                .message
                .as_deref()
                .is_some_and(|m| m.contains("... (300000 characters)"))
        );
    }
}
