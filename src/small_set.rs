//! [`SmallSet`]: an ordered set for the agent's per-key sets, which almost always hold one
//! member (the claims on a cluster IP, the slices of a Service). A `BTreeSet` allocates a node
//! of eleven slots for that one member; this holds it inline.

use smallvec::SmallVec;

/// An ordered set without repeats, its first member inline (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmallSet<T>(SmallVec<[T; 1]>);

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        SmallSet(SmallVec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    /// Adds `member` in order; returns whether it was not there yet.
    pub fn insert(&mut self, member: T) -> bool {
        match self.0.binary_search(&member) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, member);
                true
            }
        }
    }

    /// Removes the member equal to `member`; returns whether there was one.
    pub fn remove<Q>(&mut self, member: &Q) -> bool
    where
        T: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match self.0.binary_search_by(|m| m.borrow().cmp(member)) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    /// The smallest member.
    pub fn first(&self) -> Option<&T> {
        self.0.first()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The members in order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_members_ordered_and_unique() {
        let mut set = SmallSet::default();
        assert!(set.insert(3));
        assert!(set.insert(1));
        assert!(!set.insert(3));
        assert!(set.insert(2));
        assert_eq!(set.iter().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(set.first(), Some(&1));
        assert!(set.remove(&1));
        assert!(!set.remove(&1));
        assert_eq!(set.first(), Some(&2));
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn removes_by_borrowed_key() {
        let mut set: SmallSet<String> = SmallSet::default();
        set.insert("b".to_string());
        set.insert("a".to_string());
        assert!(set.remove("a"));
        assert_eq!(set.iter().collect::<Vec<_>>(), ["b"]);
        assert!(!set.is_empty());
    }
}
